//! The schema and its migrations: versioned, applied in order at open inside one transaction, and a
//! database newer than this build is refused rather than written to.

use cmr_store::StoreError;
use tokio_postgres::Client;

use crate::db;

/// The migrations, in order; the schema's version is how many have been applied.
pub const MIGRATIONS: &[&str] = &[
    // 1: the store's rows (ordered by key, bytewise), the acknowledgement mark and the write lease.
    "CREATE TABLE cmr_rows (k BYTEA PRIMARY KEY, v BYTEA NOT NULL);
     CREATE TABLE cmr_mark (id INT PRIMARY KEY, size BIGINT NOT NULL, root BYTEA NOT NULL);
     CREATE TABLE cmr_lease (id INT PRIMARY KEY, holder BYTEA NOT NULL, expires TIMESTAMPTZ NOT NULL);",
    // 2: several servers on one database: the log's write lock (one row every group locks) replaces the
    // one-writer lease, and the mark keeps the checkpoint it was made durable with.
    "CREATE TABLE cmr_head (id INT PRIMARY KEY);
     INSERT INTO cmr_head (id) VALUES (1);
     ALTER TABLE cmr_mark ADD COLUMN note TEXT;
     DROP TABLE cmr_lease;",
];

/// The schema version this build writes.
pub fn version() -> i32 {
    MIGRATIONS.len() as i32
}

/// Brings the schema to [`version`], or refuses a database whose schema is newer.
pub async fn migrate(client: &Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "SET client_min_messages = warning;
             CREATE TABLE IF NOT EXISTS cmr_schema (id INT PRIMARY KEY, version INT NOT NULL);
             INSERT INTO cmr_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;",
        )
        .await
        .map_err(db)?;
    // One migrator at a time: the others wait on the row, then find the work done.
    client.batch_execute("BEGIN").await.map_err(db)?;
    let result = async {
        let at: i32 = client
            .query_one("SELECT version FROM cmr_schema WHERE id = 1 FOR UPDATE", &[])
            .await
            .map_err(db)?
            .get(0);
        if at > version() {
            return Err(StoreError::Format(format!(
                "the database has schema version {at}, this build knows up to {}: run a newer build",
                version()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(at.max(0) as usize) {
            client.batch_execute(sql).await.map_err(db)?;
            client
                .execute(
                    "UPDATE cmr_schema SET version = $1 WHERE id = 1",
                    &[&(i as i32 + 1)],
                )
                .await
                .map_err(db)?;
        }
        Ok(())
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    client.batch_execute(end).await.map_err(db)?;
    result
}
