//! `compare` (with `--before-bin`): the same drains and latency runs with an
//! earlier relay binary and with this one, alternating in one run, so both
//! see the same machine, the same broker and the same moment. Each binary
//! migrates its own tables, so "after" includes its schema's extra work (an
//! index more per insert, say) as an upgrade would.

use super::*;

/// One configuration's figures for both binaries.
#[derive(Debug, Serialize, Clone)]
pub(crate) struct Compared {
    pub(crate) what: String,
    /// events/s (drains) or commit→ack p99 ms (latency), one per round
    pub(crate) before: Vec<f64>,
    pub(crate) after: Vec<f64>,
    /// latency only: p50 ms per round
    pub(crate) before_p50: Vec<f64>,
    pub(crate) after_p50: Vec<f64>,
}

const DRAINS: [(&str, &str); 4] =
    [("delete", "at-least-once"), ("mark", "at-least-once"), ("delete", "exactly-once"), ("mark", "exactly-once")];

pub(crate) async fn compare(env: &Env, args: &Args, before_bin: &std::path::Path) -> Vec<Compared> {
    let before_set = args.before_set.iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into()));
    let before_env = env.with_bin(before_bin, before_set.collect());
    let picked =
        |what: &str| args.compare_only.is_empty() || args.compare_only.iter().any(|o| what.contains(o.as_str()));
    let mut out: Vec<Compared> = Vec::new();
    let deliveries: &[&str] =
        if args.no_exactly_once { &["at-least-once"] } else { &["at-least-once", "exactly-once"] };
    for round in 0..args.compare_rounds {
        // before first in even rounds, after first in odd ones
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for (mode, delivery) in DRAINS.iter().filter(|(_, d)| deliveries.contains(d)) {
            let what = format!("drain not vacuumed, {mode}, {delivery} (ev/s)");
            if !picked(&what) {
                continue;
            }
            for before in order {
                let e = if before { &before_env } else { env };
                say(format!("compare round {}: {what}, {}", round + 1, label(before)));
                let d = drain_run(e, args, "not vacuumed", mode, delivery).await;
                record(&mut out, &what, before, d.events_per_s, None);
            }
        }
        for delivery in deliveries {
            for &rate in &args.rates {
                let what = format!("latency {rate} ev/s, {delivery} (commit→ack p99 ms)");
                if !picked(&what) {
                    continue;
                }
                for before in order {
                    let e = if before { &before_env } else { env };
                    say(format!("compare round {}: {what}, {}", round + 1, label(before)));
                    let l = latency(e, args, rate, delivery).await;
                    record(&mut out, &what, before, l.commit_to_ack_ms.p99, Some(l.commit_to_ack_ms.p50));
                }
            }
        }
        print_compare(&out, before_bin, &args.before_set);
    }
    out
}

fn label(before: bool) -> &'static str {
    if before {
        "before"
    } else {
        "after"
    }
}

fn record(out: &mut Vec<Compared>, what: &str, before: bool, value: f64, p50: Option<f64>) {
    let i = match out.iter().position(|c| c.what == what) {
        Some(i) => i,
        None => {
            out.push(Compared {
                what: what.into(),
                before: vec![],
                after: vec![],
                before_p50: vec![],
                after_p50: vec![],
            });
            out.len() - 1
        }
    };
    let c = &mut out[i];
    let (v, p) = if before { (&mut c.before, &mut c.before_p50) } else { (&mut c.after, &mut c.after_p50) };
    v.push(value);
    p.extend(p50);
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn runs(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" / ")
}

pub(crate) fn print_compare(c: &[Compared], before_bin: &std::path::Path, before_set: &[String]) {
    let set = if before_set.is_empty() { String::new() } else { format!(" with {}", before_set.join(" ")) };
    println!(
        "\nbefore ({}{set}) and after (this build), alternating in one run; medians, and each run",
        before_bin.display()
    );
    println!("  what                                                  │ before median │ after median │ after/before │ before runs │ after runs");
    for x in c {
        let (b, a) = (median(&x.before), median(&x.after));
        println!(
            "  {:<53} │ {b:>13.1} │ {a:>12.1} │ {:>12.2} │ {} │ {}",
            x.what,
            a / b,
            runs(&x.before),
            runs(&x.after)
        );
        if !x.before_p50.is_empty() {
            let (b, a) = (median(&x.before_p50), median(&x.after_p50));
            println!(
                "  {:<53} │ {b:>13.1} │ {a:>12.1} │ {:>12.2} │ {} │ {}",
                "   (commit→ack p50 ms)",
                a / b,
                runs(&x.before_p50),
                runs(&x.after_p50)
            );
        }
    }
}
