//! Sessions in Redis (or Valkey), so that several workers on several machines share them.
//!
//! Values are Redis strings under `llama-sessions:v:<key>`. The lock of a key is a *lease*: the string
//! `llama-sessions:lock:<key>` holding a random token, set only if absent (`SET NX PX`) and expiring after
//! the lease time, so that a worker that dies holding it locks nobody out for longer than that. Because a
//! lease can run out under a holder that stalled, every write of a leased key is *fenced*: the lease is
//! WATCHed, checked to hold this holder's token, and the write done in a MULTI/EXEC transaction that Redis
//! aborts if the lease changed since (expired or taken), writing nothing ([`Error::RemoteStore`]). Whoever read a session's version under the lease thus replaces it only
//! if nobody can have written since.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::store::{SessionStore, StoreEntry, StoreLock};
use crate::sync::lock;

/// How long a lease lasts when it is not released: longer than any save holds it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// How long connecting may take before the store is reported unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one command may take (a large session's value included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// What every key of this library starts with, so that a database can hold other data too.
const KEY_PREFIX: &str = "llama-sessions:";

/// Deletes the lease `KEYS[1]` if it holds the token `ARGV[1]` (not a lease that expired and was taken).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A [`SessionStore`] in a Redis database: `redis://[:PASSWORD@]HOST[:PORT][/DB]`, or `rediss://...` over
/// TLS (the server's certificate checked against the system's roots, or those in the file named by
/// `SSL_CERT_FILE`).
pub struct RedisStore {
    client: redis::Client,
    /// What the keys of this store's values start with after [`KEY_PREFIX`]: "v" (sessions) or "c" (KV
    /// chunks), so that a session id can never name a chunk.
    values: &'static str,
    /// The server as messages name it: host, port and database, never a password.
    name: String,
    lease: Duration,
    /// Connections not in use, reused by the next command.
    idle: Mutex<Vec<redis::Connection>>,
    /// The tokens of the leases this store holds, by key: a write to a leased key is fenced by its token.
    leases: Arc<Mutex<HashMap<String, String>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("server", &self.name)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store at `url` (`redis://`), checked by connecting to it once. A URL the client cannot take (a
    /// database that is not a number, a port out of range) is [`Error::InvalidParameter`], not a store
    /// failure: trying again would not help.
    pub fn open(url: &str) -> Result<RedisStore> {
        let client = redis::Client::open(url).map_err(|e| {
            if e.kind() == redis::ErrorKind::InvalidClientConfig {
                Error::invalid(
                    "session_dir",
                    "redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss://... (DB a number)",
                    format!("{} ({e})", redact(url)),
                )
            } else {
                Error::RemoteStore {
                    store: redact(url),
                    op: "open",
                    reason: e.to_string(),
                }
            }
        })?;
        let info = client.get_connection_info();
        let scheme = if url.starts_with("rediss://") {
            "rediss"
        } else {
            "redis"
        };
        let name = format!("{scheme}://{}/{}", info.addr(), info.redis_settings().db());
        let store = RedisStore {
            client,
            values: "v",
            name,
            lease: DEFAULT_LEASE,
            idle: Mutex::new(Vec::new()),
            leases: Arc::new(Mutex::new(HashMap::new())),
        };
        store.command("connect", |c| redis::cmd("PING").query::<String>(c))?;
        Ok(store)
    }

    /// A store of KV chunks on the same server (keys `llama-sessions:c:<hex>`), apart from the sessions: what
    /// [`crate::PrefixCache::in_store`] takes to share chunks between workers.
    pub fn chunks(&self) -> RedisStore {
        RedisStore {
            values: "c",
            leases: Arc::new(Mutex::new(HashMap::new())),
            ..self.clone()
        }
    }

    /// The same store with leases of `lease` (at least a millisecond).
    pub fn with_lease(mut self, lease: Duration) -> RedisStore {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    fn error(&self, op: &'static str, error: impl std::fmt::Display) -> Error {
        Error::RemoteStore {
            store: self.name.clone(),
            op,
            reason: error.to_string(),
        }
    }

    /// Runs `f` on a connection (an idle one, or a new one), which goes back to the idle ones if `f` did
    /// not fail (a failed connection may be in any state: it is dropped).
    fn command<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let idle = lock(&self.idle).pop();
        let mut connection = match idle {
            Some(connection) => connection,
            None => self.connect(op)?,
        };
        let value = f(&mut connection).map_err(|e| self.error(op, e))?;
        lock(&self.idle).push(connection);
        Ok(value)
    }

    fn connect(&self, op: &'static str) -> Result<redis::Connection> {
        let connection = self
            .client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .map_err(|e| self.error(op, e))?;
        connection
            .set_read_timeout(Some(COMMAND_TIMEOUT))
            .and_then(|()| connection.set_write_timeout(Some(COMMAND_TIMEOUT)))
            .map_err(|e| self.error(op, e))?;
        Ok(connection)
    }

    fn value_key(&self, key: &str) -> String {
        format!("{KEY_PREFIX}{}:{key}", self.values)
    }

    fn lease_key(key: &str) -> String {
        format!("{KEY_PREFIX}lock:{key}")
    }

    /// Takes the lease of `key` if nobody holds it; returns whether it did.
    fn try_lease(&self, key: &str, token: &str) -> Result<bool> {
        let millis = u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX);
        let set: Option<String> = self.command("lock", |c| {
            redis::cmd("SET")
                .arg(RedisStore::lease_key(key))
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(millis)
                .query(c)
        })?;
        Ok(set.is_some())
    }
}

/// `url` without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// A token no other lease holder has: this process, this moment and a counter, hashed.
pub(crate) fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&nanos.to_le_bytes());
    hasher.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hasher.finalize().to_hex()[..32].to_owned()
}

/// A held lease; dropping it releases it (if it is still this holder's).
struct RedisLease {
    store: RedisStore,
    key: String,
    token: String,
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        {
            let mut leases = lock(&self.store.leases);
            if leases.get(&self.key) == Some(&self.token) {
                leases.remove(&self.key);
            }
        }
        // An unreachable server cannot be told: the lease then runs out by itself.
        let _ = self.store.command("unlock", |c| {
            redis::Script::new(RELEASE)
                .key(RedisStore::lease_key(&self.key))
                .arg(&self.token)
                .invoke::<i64>(c)
        });
    }
}

impl StoreLock for RedisLease {}

impl Clone for RedisStore {
    /// Another handle on the same server, sharing the leases held (its own idle connections).
    fn clone(&self) -> RedisStore {
        RedisStore {
            client: self.client.clone(),
            values: self.values,
            name: self.name.clone(),
            lease: self.lease,
            idle: Mutex::new(Vec::new()),
            leases: Arc::clone(&self.leases),
        }
    }
}

impl SessionStore for RedisStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.command("read", |c| {
            redis::cmd("GET")
                .arg(self.value_key(key))
                .query::<Option<Vec<u8>>>(c)
        })
    }

    fn get_prefix(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        let stored = self.value_key(key);
        if len == 0 {
            let exists: bool =
                self.command("read", |c| redis::cmd("EXISTS").arg(&stored).query(c))?;
            return Ok(exists.then(Vec::new));
        }
        // EXISTS and GETRANGE in one transaction (GETRANGE alone cannot tell an absent key from an empty
        // value); both native commands, so a large prefix is copied once, not through a script's strings.
        let last = i64::try_from(len - 1).unwrap_or(i64::MAX);
        let (exists, prefix): (bool, Vec<u8>) = self.command("read", |c| {
            redis::pipe()
                .atomic()
                .cmd("EXISTS")
                .arg(&stored)
                .cmd("GETRANGE")
                .arg(&stored)
                .arg(0)
                .arg(last)
                .query(c)
        })?;
        Ok(exists.then_some(prefix))
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let token = lock(&self.leases).get(key).cloned();
        let Some(token) = token else {
            return self.command("write", |c| {
                redis::cmd("SET")
                    .arg(self.value_key(key))
                    .arg(value)
                    .query::<()>(c)
            });
        };
        let lease = RedisStore::lease_key(key);
        let written = self.command("write", |c| {
            // WATCH, then check the lease, then the write in MULTI/EXEC: EXEC writes nothing if the lease
            // changed (expired, or taken by another worker) since the WATCH. A Lua script would do the same
            // but copy the value twice more on the server.
            redis::cmd("WATCH").arg(&lease).query::<()>(c)?;
            let holder: Option<String> = redis::cmd("GET").arg(&lease).query(c)?;
            if holder.as_deref() != Some(token.as_str()) {
                redis::cmd("UNWATCH").query::<()>(c)?;
                return Ok(false);
            }
            let done: redis::Value = redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(self.value_key(key))
                .arg(value)
                .query(c)?;
            Ok(!matches!(done, redis::Value::Nil))
        })?;
        if written {
            Ok(())
        } else {
            Err(self.error(
                "write",
                format!(
                    "the lease on {key:?} ran out before the write (another worker may hold it now); \
                     nothing was written"
                ),
            ))
        }
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let removed: i64 = self.command("delete", |c| {
            redis::cmd("DEL").arg(self.value_key(key)).query(c)
        })?;
        Ok(removed > 0)
    }

    fn list(&self) -> Result<Vec<StoreEntry>> {
        let prefix = self.value_key("");
        let pattern = format!("{prefix}*");
        let keys: Vec<String> = self.command("list", |c| {
            let mut keys = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                keys.extend(batch);
                if next == 0 {
                    return Ok(keys);
                }
                cursor = next;
            }
        })?;
        let mut entries = Vec::with_capacity(keys.len());
        for page in keys.chunks(1000) {
            let sizes: Vec<u64> = self.command("list", |c| {
                let mut pipe = redis::pipe();
                for stored in page {
                    pipe.cmd("STRLEN").arg(stored);
                }
                pipe.query(c)
            })?;
            for (stored, size) in page.iter().zip(sizes) {
                if let Some(key) = stored.strip_prefix(&prefix) {
                    entries.push(StoreEntry {
                        key: key.to_owned(),
                        size,
                        modified: None,
                    });
                }
            }
        }
        Ok(entries)
    }

    fn lock(&self, key: &str) -> Result<Box<dyn StoreLock>> {
        let token = new_token();
        let mut wait = Duration::from_millis(2);
        while !self.try_lease(key, &token)? {
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(100));
        }
        lock(&self.leases).insert(key.to_owned(), token.clone());
        Ok(Box::new(RedisLease {
            store: self.clone(),
            key: key.to_owned(),
            token,
        }))
    }

    fn location(&self, _key: &str) -> Option<std::path::PathBuf> {
        None
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("redis://:hunter2@db:6379/1"), "redis://db:6379/1");
        assert_eq!(redact("redis://user:pw@db/0"), "redis://db/0");
        assert_eq!(redact("redis://db:6379"), "redis://db:6379");
    }

    #[test]
    fn tokens_differ() {
        let tokens: std::collections::HashSet<String> = (0..1000).map(|_| new_token()).collect();
        assert_eq!(tokens.len(), 1000);
    }
}
