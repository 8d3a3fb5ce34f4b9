//! # cmr-postgres
//!
//! CMR Vault's storage engine on PostgreSQL: [`PgStorage`] implements `cmr_store::Storage`, so the
//! store (its sequencer, the rule engine, the tree, the indexes, the acknowledgements) runs on a database
//! unchanged: `cmr_store::Store::open_on(Arc::new(PgStorage::connect(url)?), config)`.
//!
//! What it owns: the schema and its migrations ([`schema`]), the rows (one table of ordered key-value
//! rows, the same keys as on sled), the log's write lock (a row every group's transaction locks first,
//! so that any number of servers on one database take turns, each catching up on the others' entries
//! before it decides), durability (a group is committed asynchronously, then made durable by the
//! synchronous commit of the acknowledgement mark, which flushes the write-ahead log past it), and the
//! mark itself (the newest size, root and checkpoint made durable by any server).
//!
//! What it does not own: anything the store decides; TLS to the database (loopback or a Unix socket for
//! now). Design: docs/design/0007-postgres.md.
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

use cmr_core::merkle::Hash;
use cmr_store::StoreError;
use cmr_store::storage::{Acknowledged, Row, Rows, Storage, Writes};
use tokio_postgres::{Client, NoTls, Statement};

/// Rows read per round trip when scanning a range.
const PAGE: i64 = 512;

fn db(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        // The connection exceptions (class 08) and the server shutting down or starting up: out of
        // reach for now, not damaged.
        Some(d) if d.code().code().starts_with("08") || d.code().code().starts_with("57P") => {
            StoreError::Unavailable(format!("PostgreSQL: {}", d.message()))
        }
        Some(d) => StoreError::Io(format!("PostgreSQL: {}", d.message())),
        // No answer from the server at all: the connection closed or could not be made.
        None if e.is_closed()
            || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()) =>
        {
            StoreError::Unavailable(format!("PostgreSQL: {e}"))
        }
        None => StoreError::Io(format!("PostgreSQL: {e}")),
    }
}

/// The statements prepared on the connection that reads.
struct Reads {
    range_within: Statement,
    get: Statement,
    range: Statement,
    range_open: Statement,
    any: Statement,
    durable: Statement,
}

/// The connection the sequencer's groups run on: a group's transaction spans [`Storage::begin`] to
/// [`Storage::write`], holding the log's write lock.
struct Sequencer {
    client: Client,
    upsert: Statement,
    delete: Statement,
    size: Statement,
    /// Whether a group's transaction is open.
    open: bool,
}

/// The connection the syncer makes groups durable on.
struct Syncer {
    client: Client,
    mark: Statement,
}

struct Inner {
    reads: Client,
    r: Reads,
    sequencer: tokio::sync::Mutex<Sequencer>,
    syncer: tokio::sync::Mutex<Syncer>,
}

/// The store's rows in PostgreSQL, as a `cmr_store::Storage`.
pub struct PgStorage {
    rt: Option<tokio::runtime::Runtime>,
    /// The connections; replaced whole by [`Storage::reconnect`].
    inner: std::sync::RwLock<Arc<Inner>>,
    url: String,
    acknowledged: Option<(u64, Hash)>,
}

impl PgStorage {
    /// Connects to the database named by `url` (a `postgres://` URL or `key=value` pairs; a `host` that
    /// starts with `/` is the folder of a Unix socket) and applies the schema's migrations. Any number
    /// of stores may connect to one database: their groups take turns on the log's write lock.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cmr-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let (inner, acknowledged) = run_on(&rt, connect(url.to_string()))?;
        Ok(Self {
            rt: Some(rt),
            inner: std::sync::RwLock::new(inner),
            url: url.to_string(),
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
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner()).clone();
        let fut = f(inner);
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

/// Opens the three connections (reads, the sequencer's groups, the syncer's marks), brings the schema up
/// to date and prepares the statements; with the mark as the database holds it.
async fn connect(url: String) -> Result<(Arc<Inner>, Option<(u64, Hash)>), StoreError> {
    let reads = open_client(&url).await?;
    schema::migrate(&reads).await?;
    let seq = open_client(&url).await?;
    // How long the database lets this server sit inside a group's transaction (holding the log's
    // write lock) before it ends it: a server that hangs or is cut off holds the others up for
    // at most that long.
    seq.batch_execute("SET idle_in_transaction_session_timeout = '10s'")
        .await
        .map_err(db)?;
    let sequencer = Sequencer {
        upsert: seq
            .prepare(
                "INSERT INTO cmr_rows (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                     ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            )
            .await
            .map_err(db)?,
        delete: seq
            .prepare("DELETE FROM cmr_rows WHERE k = ANY($1::bytea[])")
            .await
            .map_err(db)?,
        size: seq
            .prepare("SELECT v FROM cmr_rows WHERE k = $1")
            .await
            .map_err(db)?,
        client: seq,
        open: false,
    };
    let sync = open_client(&url).await?;
    let syncer = Syncer {
            // Every sync writes the row (so that its commit is a write the log must flush), and
            // keeps the newest size, root and checkpoint whichever store syncs last.
            mark: sync
                .prepare(
                    "INSERT INTO cmr_mark (id, size, root, note) VALUES (1, $1, $2, $3) \
                     ON CONFLICT (id) DO UPDATE SET \
                     root = CASE WHEN cmr_mark.size < excluded.size THEN excluded.root ELSE cmr_mark.root END, \
                     note = CASE WHEN cmr_mark.size < excluded.size THEN excluded.note ELSE cmr_mark.note END, \
                     size = GREATEST(cmr_mark.size, excluded.size)",
                )
                .await
                .map_err(db)?,
            client: sync,
        };
    let r = Reads {
        get: reads
            .prepare("SELECT v FROM cmr_rows WHERE k = $1")
            .await
            .map_err(db)?,
        range: reads
            .prepare("SELECT k, v FROM cmr_rows WHERE k >= $1 AND k < $2 ORDER BY k LIMIT $3")
            .await
            .map_err(db)?,
        range_open: reads
            .prepare("SELECT k, v FROM cmr_rows WHERE k >= $1 ORDER BY k LIMIT $2")
            .await
            .map_err(db)?,
        // The rows of a range in key order while the values before each stay within the budget: one
        // round trip whose answer the budget bounds (a window function, which the distributed engines
        // run too).
        range_within: reads
            .prepare(
                "SELECT k, v FROM (SELECT k, v, SUM(octet_length(v)) OVER (ORDER BY k) AS total \
                 FROM cmr_rows WHERE k >= $1 AND k < $2) AS r \
                 WHERE total - octet_length(v) <= $3 ORDER BY k",
            )
            .await
            .map_err(db)?,
        any: reads
            .prepare("SELECT EXISTS (SELECT 1 FROM cmr_rows)")
            .await
            .map_err(db)?,
        durable: reads
            .prepare("SELECT size, note FROM cmr_mark WHERE id = 1")
            .await
            .map_err(db)?,
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
            sequencer: tokio::sync::Mutex::new(sequencer),
            syncer: tokio::sync::Mutex::new(syncer),
        }),
        acknowledged,
    ))
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

/// Opens a group's transaction: the log's write lock, then the log's size as the database holds it.
async fn begin(s: &mut Sequencer) -> Result<u64, StoreError> {
    if !s.open {
        // Visible at once, durable at the next sync: a syncer's synchronous commit flushes the
        // write-ahead log past this group's commit before anything of it is acknowledged.
        let begun = s
            .client
            .batch_execute(
                "BEGIN; SET LOCAL synchronous_commit TO OFF; \
                 SELECT id FROM cmr_head WHERE id = 1 FOR UPDATE",
            )
            .await;
        if let Err(e) = begun {
            // A transaction half begun (the lock not taken) must not outlive the failure.
            let _ = s.client.batch_execute("ROLLBACK").await;
            return Err(db(e));
        }
        s.open = true;
    }
    let size = s
        .client
        .query_opt(&s.size, &[&cmr_store::layout::META_SIZE])
        .await
        .map_err(db)?
        .and_then(|row| <[u8; 8]>::try_from(row.get::<_, Vec<u8>>(0)).ok())
        .map_or(0, u64::from_be_bytes);
    Ok(size)
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

    fn range_within(
        &self,
        from: &[u8],
        to: &[u8],
        max_bytes: usize,
    ) -> Result<Vec<Row>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let (from, to) = (from.to_vec(), to.to_vec());
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        self.call(move |i| async move {
            let rows = i
                .reads
                .query(&i.r.range_within, &[&from, &to, &budget])
                .await
                .map_err(db)?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
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
            let mut guard = i.sequencer.lock().await;
            let s = &mut *guard;
            // A write outside a group (the format row at open) is a group of its own.
            begin(s).await?;
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
            // Sent together (pipelined on the connection), run in order.
            let (deleted, upserted) = tokio::join!(
                async {
                    if gone.is_empty() {
                        return Ok(0);
                    }
                    s.client.execute(&s.delete, &[&gone]).await
                },
                async {
                    if keys.is_empty() {
                        return Ok(0);
                    }
                    s.client.execute(&s.upsert, &[&keys, &values]).await
                },
            );
            let end = match (&deleted, &upserted) {
                (Ok(_), Ok(_)) => "COMMIT",
                _ => "ROLLBACK",
            };
            let ended = s.client.batch_execute(end).await;
            s.open = false;
            deleted.map_err(db)?;
            upserted.map_err(db)?;
            // A commit whose answer was lost may or may not have happened.
            ended.map_err(|e| StoreError::InDoubt(format!("PostgreSQL: {e}")))
        })
    }

    fn sync(&self, size: u64, root: &Hash, checkpoint: &str) -> Result<(), StoreError> {
        let size = i64::try_from(size).map_err(|_| StoreError::Io("log size".into()))?;
        let root = root.to_vec();
        let note = checkpoint.to_string();
        self.call(move |i| async move {
            let s = i.syncer.lock().await;
            // A synchronous commit (the default): it returns once the write-ahead log is flushed up to
            // its commit record, which lies after every group committed before it, by any store.
            s.client
                .execute(&s.mark, &[&size, &root, &note])
                .await
                .map_err(db)?;
            Ok(())
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn size_on_disk(&self) -> Result<Option<u64>, StoreError> {
        // The rows' table with its indexes and TOAST. A PostgreSQL function: an engine without it
        // (the distributed ones) cannot tell, which is not an error.
        self.call(|i| async move {
            match i
                .reads
                .query_one("SELECT pg_total_relation_size('cmr_rows')", &[])
                .await
            {
                Ok(row) => Ok(u64::try_from(row.get::<_, i64>(0)).ok()),
                Err(e) if e.as_db_error().is_some() => Ok(None),
                Err(e) => Err(db(e)),
            }
        })
    }

    fn reconnects(&self) -> bool {
        true
    }

    fn reconnect(&self) -> Result<(), StoreError> {
        let rt = self.rt.as_ref().ok_or(StoreError::Closed)?;
        let (inner, _) = run_on(rt, connect(self.url.clone()))?;
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = inner;
        Ok(())
    }

    fn begin(&self) -> Result<Option<u64>, StoreError> {
        self.call(|i| async move {
            let mut s = i.sequencer.lock().await;
            begin(&mut s).await.map(Some)
        })
    }

    fn abandon(&self) {
        let _ = self.call(|i| async move {
            let mut s = i.sequencer.lock().await;
            if s.open {
                s.open = false;
                s.client.batch_execute("ROLLBACK").await.map_err(db)?;
            }
            Ok(())
        });
    }

    fn durable(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.call(|i| async move {
            Ok(i.reads
                .query_opt(&i.r.durable, &[])
                .await
                .map_err(db)?
                .and_then(|row| {
                    let size: i64 = row.get(0);
                    let note: Option<String> = row.get(1);
                    Some((u64::try_from(size).ok()?, note?))
                }))
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
        if let Some(rt) = self.rt.take() {
            // Never blocks, so dropping the storage is safe from inside another runtime; an open
            // group's transaction ends with its connection.
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
