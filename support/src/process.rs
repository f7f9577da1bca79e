//! Relay processes that die with whoever started them: each runs in its own
//! process group (killed as a group), the kernel kills it if its parent dies
//! (`PR_SET_PDEATHSIG`), and its stderr is kept for the test to read or goes
//! to a file.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a relay's stderr goes.
#[derive(Debug, Clone)]
pub enum Stderr {
    /// Kept in memory (the last few MB), for [`RelayProcess::log`].
    Keep,
    /// Appended to a file.
    File(PathBuf),
    /// The caller's stderr.
    Inherit,
}

/// The most of a relay's log kept in memory.
const KEEP_BYTES: usize = 4 << 20;

/// A child process in its own process group, killed (the whole group) when
/// dropped, and killed by the kernel if the parent dies.
pub struct RelayProcess {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl RelayProcess {
    pub fn spawn(mut cmd: Command, stderr: Stderr) -> RelayProcess {
        cmd.process_group(0).stdout(Stdio::null());
        #[allow(unsafe_code)]
        // SAFETY: prctl in the forked child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        match &stderr {
            Stderr::Keep => cmd.stderr(Stdio::piped()),
            Stderr::Inherit => cmd.stderr(Stdio::inherit()),
            Stderr::File(path) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("relay log file");
                cmd.stderr(Stdio::from(f))
            }
        };
        let mut child = cmd.spawn().expect("spawn the relay");
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            // Drain stderr continuously: a full pipe would block the relay's logging.
            let log = log.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&String::from_utf8_lossy(&buf[..n]));
                        if l.len() > KEEP_BYTES {
                            let cut = l.len() - KEEP_BYTES / 2;
                            let cut = (cut..l.len()).find(|&i| l.is_char_boundary(i)).unwrap_or(l.len());
                            l.drain(..cut);
                        }
                    }
                }
            });
        }
        RelayProcess { child: Some(child), log }
    }

    /// Nothing (while a slot's process is being replaced).
    pub fn placeholder() -> RelayProcess {
        RelayProcess { child: None, log: Arc::default() }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or_default()
    }

    /// What the relay logged so far (with [`Stderr::Keep`]).
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the kept stderr contains `needle`; panics with the log
    /// after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(std::time::Instant::now() < deadline, "no {needle:?} within {timeout:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `sig` to the process (SIGSTOP, SIGCONT, SIGTERM…).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on our own child.
            let rc = unsafe { libc::kill(c.id() as i32, sig) };
            assert_eq!(rc, 0, "kill -{sig} {}: {}", c.id(), std::io::Error::last_os_error());
        }
    }

    fn kill_group(c: &mut Child) {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child's process group.
        unsafe {
            libc::kill(-(c.id() as i32), libc::SIGKILL);
        }
        let _ = c.wait();
    }

    /// SIGKILL the whole group: no chance to clean up.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            Self::kill_group(&mut c);
        }
    }

    /// SIGTERM and wait; returns (exit code, what it logged). Fails the test if
    /// it does not exit within `timeout`.
    pub fn terminate(mut self, timeout: Duration) -> (Option<i32>, String) {
        let mut c = self.child.take().expect("relay running");
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(100)); // let the reader finish
                return (status.code(), self.log());
            }
            if Instant::now() > deadline {
                Self::kill_group(&mut c);
                panic!("relay did not exit within {timeout:?} of SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait (SIGKILL after `timeout`). Returns whether it exited 0.
    pub fn stop(mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            if Instant::now() > deadline {
                Self::kill_group(&mut c);
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Has it exited (and how)?
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to end by itself (e.g. a failpoint killed it).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(Instant::now() < deadline, "relay still running after {timeout:?}: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the process is stopped (SIGSTOP, state `T` in /proc).
    pub fn wait_stopped(&mut self, timeout: Duration) {
        let pid = self.pid();
        let deadline = Instant::now() + timeout;
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "pid (comm) S ..." — the state follows the closing parenthesis
            if stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')) {
                return;
            }
            self.assert_running();
            assert!(Instant::now() < deadline, "relay not stopped after {timeout:?}: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails the test if the process has already exited (with its stderr).
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            std::thread::sleep(Duration::from_millis(100));
            panic!("relay exited early ({status}): {}", self.log());
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            Self::kill_group(&mut c);
        }
    }
}
