//! The pattern application teams copy: change the business rows AND write the
//! outbox row in ONE transaction. Either both commit or neither does; the relay
//! publishes the event only once it is committed.
//!
//! ```text
//! cargo run --example writer -- --orders 20
//! ```
//! Uses OUTBOX_RELAY__POSTGRES__URL (the same URL the relay uses).

use std::time::Duration;

use clap::Parser;
use tokio_postgres::NoTls;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// How many orders to place.
    #[arg(long, default_value_t = 20)]
    orders: u32,
    /// Orders per second (0 = as fast as possible).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Outbox table.
    #[arg(long, default_value = "public.outbox")]
    table: String,
    /// Destination topic of the events.
    #[arg(long, default_value = "orders")]
    topic: String,
    /// Postgres URL.
    #[arg(long, env = "OUTBOX_RELAY__POSTGRES__URL")]
    postgres_url: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (mut db, conn) = tokio_postgres::connect(&args.postgres_url, NoTls).await?;
    tokio::spawn(conn);
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS orders (
             id uuid PRIMARY KEY,
             customer text NOT NULL,
             total_cents bigint NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let insert_outbox = format!("INSERT INTO {} (topic, key, payload, headers) VALUES ($1, $2, $3, $4)", args.table);
    for i in 0..args.orders {
        let order_id = Uuid::new_v4();
        let customer = format!("customer-{}", i % 5);
        let total_cents = 1_000 + i64::from(i) * 250;

        // ---- the transactional outbox pattern ----
        let tx = db.transaction().await?;
        tx.execute(
            "INSERT INTO orders (id, customer, total_cents) VALUES ($1, $2, $3)",
            &[&order_id, &customer, &total_cents],
        )
        .await?;
        let event = serde_json::json!({
            "type": "OrderPlaced",
            "order_id": order_id,
            "customer": customer,
            "total_cents": total_cents,
        });
        // key = the aggregate id: all events of one order stay in order
        let headers = serde_json::json!({ "content-type": "application/json" });
        tx.execute(&insert_outbox, &[&args.topic, &order_id.to_string(), &event, &headers]).await?;
        tx.commit().await?;
        // -------------------------------------------

        println!("placed order {order_id} for {customer}: {total_cents} cents");
        if args.rate > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(1.0 / args.rate)).await;
        }
    }
    Ok(())
}
