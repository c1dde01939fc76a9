//! Connections for the handlers' single statements, lent one statement at a time.
//!
//! A handler's read is one statement (a point lookup, a page, the "does this
//! world exist" probe). Through the pool it would cost two round trips: sqlx
//! checks every connection that goes back into its pool with a `Sync` and its
//! `ReadyForQuery`, a second wake-up of the server process per request.
//! [`Readers`] keeps its own connections, opened with the pool's options (the
//! same role, `default_transaction_read_only`, `statement_timeout`), and lends
//! each to one statement at a time:
//!
//! - at most `size` connections are open or lent at once; a statement waits
//!   (first come, first served) for one, then opens one when none is idle;
//! - a connection comes back only after a statement that succeeded on it; one
//!   whose statement failed or was abandoned midway (the request was dropped)
//!   is closed, and the next statement opens a fresh one;
//! - a connection idle for a while is pinged before it is lent again (the
//!   server, a restart or a proxy may have closed it meanwhile); one in steady
//!   use has just answered a statement;
//! - like the pool's, a connection idle longer than the pool's idle timeout,
//!   or older than its maximum lifetime, is closed instead of lent.
//!
//! Transactions (`/state`), the `LISTEN` connections and the event streams
//! use the pool.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgArguments, PgConnectOptions, PgRow};
use sqlx::query::{QueryAs, QueryScalar};
use sqlx::{ConnectOptions, Connection, FromRow, PgConnection, PgPool, Postgres};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a connection may sit idle before it is pinged before use.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// Connections lent to one statement at a time; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Readers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: Arc<PgConnectOptions>,
    /// One permit per connection that may be open: held while it is lent.
    permits: Arc<Semaphore>,
    /// Most recently returned last.
    idle: Mutex<Vec<Idle>>,
    /// Longest wait for a permit, and for a new connection.
    acquire_timeout: Duration,
    /// The pool's: idle longer, and the connection is closed.
    idle_timeout: Option<Duration>,
    /// The pool's: older, and the connection is closed when it comes back.
    max_lifetime: Option<Duration>,
}

#[derive(Debug)]
struct Idle {
    connection: PgConnection,
    opened: Instant,
    since: Instant,
}

impl Readers {
    /// Up to `size` connections (at least one) opened like `pool`'s, with its
    /// acquire timeout, idle timeout and maximum lifetime.
    pub fn new(pool: &PgPool, size: u32) -> Readers {
        let size = usize::try_from(size.max(1)).unwrap_or(usize::MAX);
        Readers {
            inner: Arc::new(Inner {
                options: pool.connect_options(),
                permits: Arc::new(Semaphore::new(size.min(Semaphore::MAX_PERMITS))),
                idle: Mutex::new(Vec::new()),
                acquire_timeout: pool.options().get_acquire_timeout(),
                idle_timeout: pool.options().get_idle_timeout(),
                max_lifetime: pool.options().get_max_lifetime(),
            }),
        }
    }

    /// [`QueryAs::fetch_optional`] on a lent connection.
    pub async fn fetch_optional<O, A>(
        &self,
        query: QueryAs<'_, Postgres, O, A>,
    ) -> Result<Option<O>, sqlx::Error>
    where
        O: Send + Unpin + for<'r> FromRow<'r, PgRow>,
        A: sqlx::IntoArguments<Postgres> + Send,
    {
        let mut lent = self.lend().await?;
        let result = query.fetch_optional(lent.connection()).await;
        lent.give_back_if(result.is_ok());
        result
    }

    /// [`QueryAs::fetch_all`] on a lent connection.
    pub async fn fetch_all<O, A>(
        &self,
        query: QueryAs<'_, Postgres, O, A>,
    ) -> Result<Vec<O>, sqlx::Error>
    where
        O: Send + Unpin + for<'r> FromRow<'r, PgRow>,
        A: sqlx::IntoArguments<Postgres> + Send,
    {
        let mut lent = self.lend().await?;
        let result = query.fetch_all(lent.connection()).await;
        lent.give_back_if(result.is_ok());
        result
    }

    /// [`QueryScalar::fetch_one`] on a lent connection.
    pub async fn fetch_scalar<O>(
        &self,
        query: QueryScalar<'_, Postgres, O, PgArguments>,
    ) -> Result<O, sqlx::Error>
    where
        O: Send + Unpin,
        (O,): for<'r> FromRow<'r, PgRow>,
    {
        let mut lent = self.lend().await?;
        let result = query.fetch_one(lent.connection()).await;
        lent.give_back_if(result.is_ok());
        result
    }

    /// An idle connection (pinged if it sat idle), or a new one, once a permit
    /// is free.
    async fn lend(&self) -> Result<Lent, sqlx::Error> {
        let inner = &self.inner;
        let permit = tokio::time::timeout(
            inner.acquire_timeout,
            Arc::clone(&inner.permits).acquire_owned(),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
        .map_err(|_| sqlx::Error::PoolClosed)?;
        while let Some(Idle {
            mut connection,
            opened,
            since,
        }) = inner.take_idle()
        {
            if since.elapsed() < IDLE_BEFORE_PING || connection.ping().await.is_ok() {
                return Ok(Lent::new(connection, opened, inner, permit));
            }
            close_in_background(connection);
        }
        let connection = tokio::time::timeout(inner.acquire_timeout, inner.options.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        Ok(Lent::new(connection, Instant::now(), inner, permit))
    }
}

impl Inner {
    /// The most recently returned idle connection; the ones idle past the
    /// idle timeout (the oldest returned, at the front) are closed first.
    fn take_idle(&self) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(timeout) = self.idle_timeout {
            let expired = idle.partition_point(|c| c.since.elapsed() >= timeout);
            for stale in idle.drain(..expired) {
                close_in_background(stale.connection);
            }
        }
        idle.pop()
    }
}

/// A connection lent to one statement: back to the idle list with
/// [`Lent::give_back_if`], closed when dropped otherwise.
struct Lent {
    connection: Option<PgConnection>,
    opened: Instant,
    readers: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl Lent {
    fn new(
        connection: PgConnection,
        opened: Instant,
        readers: &Arc<Inner>,
        permit: OwnedSemaphorePermit,
    ) -> Lent {
        Lent {
            connection: Some(connection),
            opened,
            readers: Arc::clone(readers),
            _permit: permit,
        }
    }

    fn connection(&mut self) -> &mut PgConnection {
        self.connection
            .as_mut()
            .expect("a lent connection is only taken by give_back_if, which consumes it")
    }

    /// Returns the connection to the idle list when `healthy` (its statement
    /// completed) and not past its lifetime; otherwise drops it, which closes
    /// it. The permit is released after the connection is back, so the next
    /// statement finds it idle.
    fn give_back_if(mut self, healthy: bool) {
        let expired = self
            .readers
            .max_lifetime
            .is_some_and(|lifetime| self.opened.elapsed() >= lifetime);
        if !healthy || expired {
            return;
        }
        if let Some(connection) = self.connection.take() {
            self.readers
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Idle {
                    connection,
                    opened: self.opened,
                    since: Instant::now(),
                });
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        // Dropped midway (its request was abandoned) or after a failed
        // statement: the connection may have a reply in flight or be broken.
        if let Some(connection) = self.connection.take() {
            close_in_background(connection);
        }
    }
}

/// Ends a connection politely (`Terminate`) without holding the caller up;
/// outside a runtime it is simply dropped.
fn close_in_background(connection: PgConnection) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = connection.close().await;
        });
    }
}
