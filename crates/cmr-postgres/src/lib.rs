//! # cmr-postgres
//!
//! CMR Vault's storage engine on PostgreSQL: [`PgStorage`] implements `cmr_store::Storage`, so the
//! store (its sequencer, the rule engine, the tree, the indexes, the acknowledgements) runs on a database
//! unchanged: `cmr_store::Store::open_on(Arc::new(PgStorage::connect(url)?), config)`.
//!
//! What it owns: the schema and its migrations ([`schema`]), the rows (one table of ordered key-value
//! rows, the same keys as on sled), the write lease with its fencing token (one writer at a time; every
//! group's transaction checks the token, so a writer that lost the lease cannot write), durability (a
//! group is committed asynchronously, then made durable by the synchronous commit of the acknowledgement
//! mark, which flushes the write-ahead log up to it), and the mark itself (the newest size and root made
//! durable, which the store checks at open).
//!
//! What it does not own: anything the store decides; TLS to the database (loopback or a Unix socket for
//! now); several servers writing at once (one holds the lease; docs/design/0007-postgres.md).
//!
//! The SQL is kept to what the distributed PostgreSQL-compatible engines also run (no advisory locks, no
//! LISTEN/NOTIFY, no sequences); the design note lists each feature used.
#![forbid(unsafe_code)]

#[cfg(feature = "testkit")]
pub mod cluster;
pub mod schema;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cmr_core::merkle::Hash;
use cmr_store::StoreError;
use cmr_store::storage::{Acknowledged, Row, Rows, Storage, Writes};
use tokio_postgres::{Client, NoTls, Statement};

/// How long the write lease lasts without renewal. Every group and sync renews it, and a heartbeat does
/// every [`HEARTBEAT`] while idle; after a crash, the next writer waits at most this long.
pub const LEASE_SECONDS: u64 = 10;

/// How often an idle writer renews its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Rows read per round trip when scanning a range.
const PAGE: i64 = 512;

fn db(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(d) => StoreError::Io(format!("PostgreSQL: {}", d.message())),
        None => StoreError::Io(format!("PostgreSQL: {e}")),
    }
}

/// The statements prepared on the connection that reads.
struct Reads {
    get: Statement,
    range: Statement,
    range_open: Statement,
    any: Statement,
    renew: Statement,
}

/// The statements prepared on the connection that writes.
struct Writer {
    client: Client,
    renew: Statement,
    upsert: Statement,
    delete: Statement,
    mark: Statement,
}

struct Inner {
    reads: Client,
    r: Reads,
    writer: tokio::sync::Mutex<Writer>,
    /// This process's lease holder token: random, so that a restarted process is another holder.
    holder: Vec<u8>,
}

/// The store's rows in PostgreSQL, as a `cmr_store::Storage`.
pub struct PgStorage {
    rt: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
    acknowledged: Option<(u64, Hash)>,
}

const RENEW: &str = "UPDATE cmr_lease SET expires = now() + interval '10 seconds' \
                     WHERE id = 1 AND holder = $1";

impl PgStorage {
    /// Connects to the database named by `url` (a `postgres://` URL or `key=value` pairs; a `host` that
    /// starts with `/` is the folder of a Unix socket), applies the schema's migrations, and takes the
    /// write lease, waiting up to [`LEASE_SECONDS`] and a little more for one a crashed writer left.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_waiting(url, Duration::from_secs(LEASE_SECONDS + 2))
    }

    /// [`PgStorage::connect`], waiting at most `wait` for the write lease.
    pub fn connect_waiting(url: &str, wait: Duration) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cmr-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let url = url.to_string();
        let (inner, acknowledged) = run_on(&rt, async move {
            let reads = open_client(&url).await?;
            schema::migrate(&reads).await?;
            let holder = rand::random::<[u8; 16]>().to_vec();
            take_lease(&reads, &holder, wait).await?;
            let writes = open_client(&url).await?;
            let writer = Writer {
                renew: writes.prepare(RENEW).await.map_err(db)?,
                upsert: writes
                    .prepare(
                        "INSERT INTO cmr_rows (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                         ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                    )
                    .await
                    .map_err(db)?,
                delete: writes
                    .prepare("DELETE FROM cmr_rows WHERE k = ANY($1::bytea[])")
                    .await
                    .map_err(db)?,
                mark: writes
                    .prepare(
                        "INSERT INTO cmr_mark (id, size, root) VALUES (1, $1, $2) \
                         ON CONFLICT (id) DO UPDATE SET size = excluded.size, root = excluded.root",
                    )
                    .await
                    .map_err(db)?,
                client: writes,
            };
            let r = Reads {
                get: reads
                    .prepare("SELECT v FROM cmr_rows WHERE k = $1")
                    .await
                    .map_err(db)?,
                range: reads
                    .prepare(
                        "SELECT k, v FROM cmr_rows WHERE k >= $1 AND k < $2 ORDER BY k LIMIT $3",
                    )
                    .await
                    .map_err(db)?,
                range_open: reads
                    .prepare("SELECT k, v FROM cmr_rows WHERE k >= $1 ORDER BY k LIMIT $2")
                    .await
                    .map_err(db)?,
                any: reads
                    .prepare("SELECT EXISTS (SELECT 1 FROM cmr_rows)")
                    .await
                    .map_err(db)?,
                renew: reads.prepare(RENEW).await.map_err(db)?,
            };
            let acknowledged = reads
                .query_opt("SELECT size, root FROM cmr_mark WHERE id = 1", &[])
                .await
                .map_err(db)?
                .and_then(|row| {
                    let size: i64 = row.get(0);
                    let root: Vec<u8> = row.get(1);
                    Some((u64::try_from(size).ok()?, Hash::try_from(root).ok()?))
                });
            Ok((
                Arc::new(Inner {
                    reads,
                    r,
                    writer: tokio::sync::Mutex::new(writer),
                    holder,
                }),
                acknowledged,
            ))
        })?;
        // While idle, the lease is kept by a heartbeat; a lost lease shows at the next write.
        let beat = Arc::downgrade(&inner);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let Some(inner) = beat.upgrade() else { return };
                let _ = inner.reads.execute(&inner.r.renew, &[&inner.holder]).await;
            }
        });
        Ok(Self {
            rt: Some(rt),
            inner,
            acknowledged,
        })
    }

    /// Runs `f` on the driver's runtime and waits for it on this thread, which may be a plain thread
    /// (the sequencer, the syncer) or a worker of another runtime (the server's handlers).
    fn call<T, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let rt = self.rt.as_ref().ok_or(StoreError::Closed)?;
        let fut = f(self.inner.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StoreError::Io("the database connection stopped".into()))?
    }

    /// One page of rows from `from` (inclusive) to `to` (exclusive, or the end).
    fn page(&self, from: Vec<u8>, to: Option<Vec<u8>>) -> Result<Vec<Row>, StoreError> {
        self.call(move |i| async move {
            let rows = match &to {
                Some(to) => i.reads.query(&i.r.range, &[&from, to, &PAGE]).await,
                None => i.reads.query(&i.r.range_open, &[&from, &PAGE]).await,
            }
            .map_err(db)?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }
}

async fn open_client(url: &str) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(db)?;
    tokio::spawn(async move {
        // Ends when the client is dropped or the server goes away; a gone server shows as an error at
        // the next statement.
        let _ = connection.await;
    });
    Ok(client)
}

/// Takes the write lease for `holder`, waiting for one that another holder lets expire.
async fn take_lease(client: &Client, holder: &Vec<u8>, wait: Duration) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let taken = client
            .query_opt(
                "INSERT INTO cmr_lease (id, holder, expires) \
                 VALUES (1, $1, now() + interval '10 seconds') \
                 ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, expires = excluded.expires \
                 WHERE cmr_lease.expires < now() OR cmr_lease.holder = excluded.holder \
                 RETURNING holder",
                &[holder],
            )
            .await
            .map_err(db)?;
        if taken.is_some() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Format(
                "another server holds this database's write lease and keeps renewing it: one server \
                 writes to a database at a time"
                    .into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits on `rt` for `fut` from a thread outside it.
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| StoreError::Io("the database connection stopped".into()))?
}

/// Checks, inside a group's transaction, that this process still holds the lease, and renews it.
async fn fence(
    tx: &tokio_postgres::Transaction<'_>,
    renew: &Statement,
    holder: &Vec<u8>,
) -> Result<(), StoreError> {
    match tx.execute(renew, &[holder]).await.map_err(db)? {
        1 => Ok(()),
        _ => Err(StoreError::Io(
            "this server lost the database's write lease: another server writes now".into(),
        )),
    }
}

/// The first key after every key that starts with `prefix`, if there is one.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Rows from a range, read a page at a time.
struct Pages<'a> {
    storage: &'a PgStorage,
    from: Option<Vec<u8>>,
    to: Option<Vec<u8>>,
    buffered: VecDeque<Row>,
}

impl Iterator for Pages<'_> {
    type Item = Result<Row, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buffered.is_empty() {
            let from = self.from.take()?;
            match self.storage.page(from, self.to.clone()) {
                Ok(rows) => {
                    if rows.len() as i64 == PAGE
                        && let Some((last, _)) = rows.last()
                    {
                        // The next page starts right after the last key read.
                        let mut next = last.clone();
                        next.push(0);
                        self.from = Some(next);
                    }
                    self.buffered = rows.into();
                }
                Err(e) => return Some(Err(e)),
            }
        }
        self.buffered.pop_front().map(Ok)
    }
}

impl Storage for PgStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.call(move |i| async move {
            Ok(i.reads
                .query_opt(&i.r.get, &[&key])
                .await
                .map_err(db)?
                .map(|row| row.get(0)))
        })
    }

    fn range(&self, from: &[u8], to: &[u8]) -> Rows<'_> {
        Box::new(Pages {
            storage: self,
            from: (from < to).then(|| from.to_vec()),
            to: Some(to.to_vec()),
            buffered: VecDeque::new(),
        })
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Rows<'_> {
        Box::new(Pages {
            storage: self,
            from: Some(prefix.to_vec()),
            to: prefix_end(prefix),
            buffered: VecDeque::new(),
        })
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        self.call(|i| async move {
            let any: bool = i.reads.query_one(&i.r.any, &[]).await.map_err(db)?.get(0);
            Ok(!any)
        })
    }

    fn write(&self, writes: Writes) -> Result<(), StoreError> {
        self.call(move |i| async move {
            let mut w = i.writer.lock().await;
            let w = &mut *w;
            let tx = w.client.transaction().await.map_err(db)?;
            // Visible at once, durable at the next sync: the syncer's synchronous commit flushes the
            // write-ahead log up to here before anything of this group is acknowledged.
            let (mut keys, mut values, mut gone) = (Vec::new(), Vec::new(), Vec::new());
            for (k, v) in writes {
                match v {
                    Some(v) => {
                        keys.push(k);
                        values.push(v);
                    }
                    None => gone.push(k),
                }
            }
            // The statements are sent together (pipelined on the connection) and run in order; the
            // transaction commits only if the fence held.
            let (relaxed, fenced, deleted, upserted) = tokio::join!(
                tx.batch_execute("SET LOCAL synchronous_commit TO OFF"),
                fence(&tx, &w.renew, &i.holder),
                async {
                    if gone.is_empty() {
                        return Ok(0);
                    }
                    tx.execute(&w.delete, &[&gone]).await
                },
                async {
                    if keys.is_empty() {
                        return Ok(0);
                    }
                    tx.execute(&w.upsert, &[&keys, &values]).await
                },
            );
            relaxed.map_err(db)?;
            fenced?;
            deleted.map_err(db)?;
            upserted.map_err(db)?;
            tx.commit().await.map_err(db)
        })
    }

    fn sync(&self, size: u64, root: &Hash) -> Result<(), StoreError> {
        let size = i64::try_from(size).map_err(|_| StoreError::Io("log size".into()))?;
        let root = root.to_vec();
        self.call(move |i| async move {
            let mut w = i.writer.lock().await;
            let w = &mut *w;
            // A synchronous commit (the default): it returns once the write-ahead log is flushed up to
            // its commit record, which is after every group written before it.
            let tx = w.client.transaction().await.map_err(db)?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&size, &root];
            let (fenced, marked) = tokio::join!(
                fence(&tx, &w.renew, &i.holder),
                tx.execute(&w.mark, &params)
            );
            fenced?;
            marked.map_err(db)?;
            tx.commit().await.map_err(db)
        })
    }

    fn acknowledged(&self) -> Option<Acknowledged> {
        self.acknowledged.map(|(size, root)| Acknowledged {
            size,
            root,
            remedy: "the database lost entries it had acknowledged (restored from an older backup, or a \
                     failover to a replica that was behind). Restore a backup that holds them; to \
                     accept the loss instead, run `DELETE FROM cmr_mark` and open again"
                .into(),
        })
    }
}

impl Drop for PgStorage {
    fn drop(&mut self) {
        // Let the lease go, so that the next writer need not wait for it to expire.
        let _ = self.call(|i| async move {
            i.reads
                .execute(
                    "UPDATE cmr_lease SET expires = now() - interval '1 second' \
                     WHERE id = 1 AND holder = $1",
                    &[&i.holder],
                )
                .await
                .map_err(db)
        });
        if let Some(rt) = self.rt.take() {
            // Never blocks, so dropping the storage is safe from inside another runtime.
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn the_end_of_a_prefix_is_the_next_key_after_all_it_starts() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(&[]), None);
    }
}
