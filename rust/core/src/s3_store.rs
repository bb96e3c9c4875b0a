//! Sessions in S3-compatible object storage (Amazon S3, MinIO, Cloudflare R2, Ceph...), so that workers on
//! many machines share them through storage that operators already run.
//!
//! Under `s3://BUCKET/PREFIX`, values are the objects `PREFIX/v/<key>` (sessions) and `PREFIX/c/<hex>` (KV
//! chunks), and the lock of a key is a *lease*: the object `PREFIX/lock/<key>`, holding a random token and
//! the moment it expires, created only if absent (`If-None-Match: *`). A lease that expired is taken over
//! by replacing exactly the version that was read (`If-Match: <ETag>`), so that of two workers taking it
//! over at once, one wins. Because a lease can run out under a holder that stalled, every write of a leased
//! key is *fenced* by the value's own version: the holder remembers the ETag of what it last read or wrote
//! of the key (or that there was none) and replaces the value only if it is still that version (`If-Match`,
//! or `If-None-Match: *`); otherwise the store has changed under it and nothing is written
//! ([`Error::RemoteStore`]).
//!
//! The store needs conditional writes (`If-Match` and `If-None-Match` on PutObject): Amazon S3 since
//! November 2024, MinIO, R2 and most others. The client is `object_store`'s, driven from the calling thread
//! by a small runtime of its own: do not call the store from inside an async runtime's worker thread (it
//! says so instead of blocking one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, UpdateVersion,
};

use crate::error::{Error, Result};
use crate::store::{SessionStore, StoreEntry, StoreLock};
use crate::sync::lock;

/// How long a lease lasts when it is not released: longer than any save holds it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// How long connecting may take before the store is reported unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take (a large session's value included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How many times a request that failed for a transient reason is retried, and for how long at most.
const RETRIES: usize = 3;
const RETRY_TIMEOUT: Duration = Duration::from_secs(20);
/// The most bytes of a lease object read: a token and a time are a few dozen bytes; a larger object is not
/// a lease of this library, and is not read whole.
const LEASE_READ_LIMIT: u64 = 256;

/// The runtime that drives every S3 store's requests, started on first use: two threads, enough for the
/// blocking callers that wait on it.
fn runtime() -> std::result::Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("llama-sessions-s3")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the S3 client's runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// What a lease holder knows of its key's value: the version it last read or wrote, which its next write
/// must still find (`None`: there was no value). The holder is the thread that took the lease (a save
/// locks, reads and writes on one thread): only its reads move the fence, so that another thread of the
/// process reading the key meanwhile cannot make the holder's write replace a version it never read.
struct HeldLease {
    token: String,
    holder: std::thread::ThreadId,
    value: Option<UpdateVersion>,
}

impl HeldLease {
    fn held_here(&self) -> bool {
        self.holder == std::thread::current().id()
    }
}

/// A [`SessionStore`] in an S3 bucket: `s3://BUCKET[/PREFIX][?OPTION=VALUE&...]`.
///
/// Endpoint, region and credentials are taken the usual way: the `AWS_*` environment variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` or `AWS_DEFAULT_REGION`,
/// `AWS_ENDPOINT_URL` or `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`), the instance's or task's role, or options in the
/// URL's query, named as `object_store` names them (`endpoint`, `region`, `allow_http`, `access_key_id`,
/// ...). The options override the environment.
pub struct S3Store {
    store: Arc<AmazonS3>,
    /// The prefix of every object of this library in the bucket (possibly empty).
    root: Vec<String>,
    /// "v" (sessions) or "c" (KV chunks): the folder of this store's values under the root, so that a
    /// session id can never name a chunk.
    values: &'static str,
    /// The bucket and prefix as messages name them, never an option or a credential.
    name: String,
    lease: Duration,
    /// The leases this store holds, by key: a write to a leased key is fenced by the version it holds.
    leases: Arc<Mutex<HashMap<String, HeldLease>>>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.name)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Clone for S3Store {
    /// Another handle on the same bucket and prefix, sharing the leases held.
    fn clone(&self) -> S3Store {
        S3Store {
            store: Arc::clone(&self.store),
            root: self.root.clone(),
            values: self.values,
            name: self.name.clone(),
            lease: self.lease,
            leases: Arc::clone(&self.leases),
        }
    }
}

impl S3Store {
    /// A store at `url` (`s3://BUCKET[/PREFIX][?OPTION=VALUE&...]`), checked by listing its sessions once
    /// (which needs the bucket to exist and the credentials to be accepted). [`Error::InvalidParameter`]
    /// (`session_dir`) for a URL that is not one; [`Error::RemoteStore`] for a store that cannot be reached
    /// or refuses. No message shows an option's value or a credential.
    pub fn open(url: &str) -> Result<S3Store> {
        const EXPECTED: &str = "s3://BUCKET[/PREFIX][?OPTION=VALUE&...] with S3 options such as endpoint, \
                                region, allow_http (credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)";
        let refuse = |found: String| Error::invalid("session_dir", EXPECTED, found);
        let parsed = url::Url::parse(url)
            .map_err(|e| refuse(format!("a URL that cannot be parsed ({e})")))?;
        if parsed.scheme() != "s3" {
            return Err(refuse(format!("a {}:// URL", parsed.scheme())));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| refuse("a URL that names no bucket".to_owned()))?
            .to_owned();
        if !parsed.username().is_empty() || parsed.password().is_some() || parsed.port().is_some() {
            return Err(refuse(
                "credentials or a port before the bucket (give the endpoint as ?endpoint=http://HOST:PORT)"
                    .to_owned(),
            ));
        }
        let root: Vec<String> = parsed
            .path_segments()
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        let name = if root.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{}", root.join("/"))
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT),
            )
            .with_retry(RetryConfig {
                max_retries: RETRIES,
                retry_timeout: RETRY_TIMEOUT,
                ..RetryConfig::default()
            });
        if std::env::var_os("AWS_ENDPOINT").is_none() {
            // The name the AWS SDKs and CLI read; object_store reads AWS_ENDPOINT.
            if let Some(endpoint) = std::env::var_os("AWS_ENDPOINT_URL") {
                builder = builder.with_endpoint(endpoint.to_string_lossy());
            }
        }
        let mut has_credentials = std::env::var_os("AWS_ACCESS_KEY_ID").is_some()
            || std::env::var_os("AWS_WEB_IDENTITY_TOKEN_FILE").is_some()
            || std::env::var_os("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_some();
        for (option, value) in parsed.query_pairs() {
            let key: AmazonS3ConfigKey = option
                .parse()
                .map_err(|_| refuse(format!("the unknown option {option:?}")))?;
            if matches!(key, AmazonS3ConfigKey::Bucket) {
                return Err(refuse(
                    "the bucket given as an option (it is the URL's host)".to_owned(),
                ));
            }
            has_credentials |= matches!(
                key,
                AmazonS3ConfigKey::AccessKeyId | AmazonS3ConfigKey::SkipSignature
            );
            builder = builder.with_config(key, value.into_owned());
        }
        let store = builder
            .build()
            .map_err(|e| refuse(format!("options the S3 client refuses ({e})")))?;
        let store = S3Store {
            store: Arc::new(store),
            root,
            values: "v",
            name,
            lease: DEFAULT_LEASE,
            leases: Arc::new(Mutex::new(HashMap::new())),
        };
        let prefix = store.folder(store.values);
        let listed = store.run_raw("connect", async {
            let mut listing = store.store.list(Some(&prefix));
            listing.try_next().await.map(|_| ())
        })?;
        if let Err(e) = listed {
            let mut reason = e.to_string();
            if !has_credentials {
                reason.push_str(
                    " (no credentials were given: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run \
                     where an instance or task role provides them)",
                );
            }
            return Err(store.error("connect", reason));
        }
        store.check_conditional_writes()?;
        Ok(store)
    }

    /// Checks that the store honours conditional writes, which leases and fenced writes rely on: a store
    /// that ignored them would let two workers hold one lease and overwrite each other's turns silently.
    /// Writes, rewrites and deletes one probe object (a name no session id can have: ids never start with
    /// a dot).
    fn check_conditional_writes(&self) -> Result<()> {
        let path = self.path_in(
            "lock",
            &format!(".probe-{}", crate::redis_store::new_token()),
        );
        let put = |mode: PutMode| {
            self.run_raw(
                "connect",
                self.store
                    .put_opts(&path, PutPayload::from("probe"), PutOptions::from(mode)),
            )
        };
        let created = put(PutMode::Create)?.map_err(|e| self.error("connect", e))?;
        let again = put(PutMode::Create)?;
        let stale = put(PutMode::Update(UpdateVersion {
            e_tag: Some("\"0123456789abcdef0123456789abcdef\"".to_owned()),
            version: None,
        }))?;
        let current = put(PutMode::Update(UpdateVersion::from(created)))?;
        let _ = self.run_raw("connect", self.store.delete(&path))?;
        let ignores = |what: &str| {
            self.error(
                "connect",
                format!(
                    "this store does not honour conditional writes ({what}); leases and version checks \
                     rely on them, so it cannot be shared safely (Amazon S3, MinIO and Cloudflare R2 honour \
                     them)"
                ),
            )
        };
        match again {
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Ok(_) => return Err(ignores("If-None-Match: * replaced an existing object")),
            Err(e) => return Err(self.error("connect", e)),
        }
        match stale {
            Err(object_store::Error::Precondition { .. }) => {}
            Ok(_) => return Err(ignores("If-Match replaced an object whose ETag differed")),
            Err(e) => return Err(self.error("connect", e)),
        }
        current.map_err(|e| self.error("connect", e))?;
        Ok(())
    }

    /// A store of KV chunks in the same bucket (objects `PREFIX/c/<hex>`), apart from the sessions: what
    /// [`crate::PrefixCache::in_store`] takes to share chunks between workers.
    pub fn chunks(&self) -> S3Store {
        S3Store {
            values: "c",
            leases: Arc::new(Mutex::new(HashMap::new())),
            ..self.clone()
        }
    }

    /// The same store with leases of `lease` (at least a millisecond).
    pub fn with_lease(mut self, lease: Duration) -> S3Store {
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

    /// Runs one request to completion on the client's runtime, from this (blocking) thread.
    fn run<T>(
        &self,
        op: &'static str,
        request: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        self.run_raw(op, request)?.map_err(|e| self.error(op, e))
    }

    /// [`S3Store::run`], leaving the request's own error to the caller (a failed precondition, an absent
    /// object).
    fn run_raw<T>(
        &self,
        op: &'static str,
        request: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>> {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Blocking a runtime's worker thread on another runtime panics in tokio: say what to do instead.
            return Err(self.error(
                op,
                "called from inside an async runtime; call the store from a blocking thread \
                 (tokio::task::spawn_blocking)",
            ));
        }
        let runtime = runtime().map_err(|e| self.error(op, e))?;
        Ok(runtime.block_on(request))
    }

    /// The path of `name` in the folder `folder` under the root.
    fn path_in(&self, folder: &str, name: &str) -> ObjectPath {
        self.root
            .iter()
            .map(String::as_str)
            .chain([folder, name])
            .collect()
    }

    /// The folder `folder` under the root, as a listing prefix.
    fn folder(&self, folder: &str) -> ObjectPath {
        self.root
            .iter()
            .map(String::as_str)
            .chain([folder])
            .collect()
    }

    fn value_path(&self, key: &str) -> ObjectPath {
        self.path_in(self.values, key)
    }

    fn lease_path(&self, key: &str) -> ObjectPath {
        self.path_in("lock", key)
    }

    /// Remembers the version of `key`'s value just seen, if this thread holds its lease.
    fn saw(&self, key: &str, version: Option<UpdateVersion>) {
        if let Some(held) = lock(&self.leases)
            .get_mut(key)
            .filter(|held| held.held_here())
        {
            held.value = version;
        }
    }

    /// The value a read found (or `None` for an absent one), remembering its version for the fence if this
    /// store holds the key's lease; the read's other failures as they are.
    fn settle_read(
        &self,
        key: &str,
        read: object_store::Result<(object_store::ObjectMeta, bytes::Bytes)>,
    ) -> object_store::Result<Option<Vec<u8>>> {
        match read {
            Ok((meta, bytes)) => {
                self.saw(key, Some(version_of(meta)));
                Ok(Some(bytes.to_vec()))
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.saw(key, None);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The lease's content: the holder's token and when it expires (milliseconds since the epoch, by the
    /// holder's clock).
    fn lease_content(&self, token: &str) -> String {
        let expires = now_millis().saturating_add(millis(self.lease));
        format!("{token} {expires}")
    }

    /// Takes the lease of `key` if nobody holds it, or if the lease there has expired; returns whether it
    /// did.
    fn try_lease(&self, key: &str, token: &str) -> Result<bool> {
        let path = self.lease_path(key);
        let create = PutOptions::from(PutMode::Create);
        let created = self.run_raw(
            "lock",
            self.store
                .put_opts(&path, PutPayload::from(self.lease_content(token)), create),
        )?;
        match created {
            Ok(_) => return Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(self.error("lock", e)),
        }
        let options = GetOptions::new().with_range(Some(GetRange::Bounded(0..LEASE_READ_LIMIT)));
        let current = self.run_raw("lock", read_object(&self.store, &path, options))?;
        let (meta, content) = match current {
            Ok(current) => current,
            // Released since: try again at once.
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(self.error("lock", e)),
        };
        if lease_token(&content) == Some(token.as_bytes()) {
            // Ours: a create that succeeded, retried after its answer was lost, found itself.
            return Ok(true);
        }
        let modified = u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
        if now_millis() < lease_expiry(&content, modified) {
            return Ok(false);
        }
        // Expired: replace exactly the version read, so that one of several takers wins.
        let replace = PutOptions::from(PutMode::Update(version_of(meta)));
        let replaced = self.run_raw(
            "lock",
            self.store
                .put_opts(&path, PutPayload::from(self.lease_content(token)), replace),
        )?;
        match replaced {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::NotFound { .. },
            ) => Ok(false),
            Err(e) => Err(self.error("lock", e)),
        }
    }

    /// The version of `key`'s value now (`None`: there is none).
    fn value_version(&self, key: &str) -> Result<Option<UpdateVersion>> {
        match self.run_raw("lock", self.store.head(&self.value_path(key)))? {
            Ok(meta) => Ok(Some(version_of(meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("lock", e)),
        }
    }
}

/// The object at `path` (the part `options` ask for) with what describes it.
async fn read_object(
    store: &AmazonS3,
    path: &ObjectPath,
    options: GetOptions,
) -> object_store::Result<(object_store::ObjectMeta, bytes::Bytes)> {
    let result = store.get_opts(path, options).await?;
    let meta = result.meta.clone();
    Ok((meta, result.bytes().await?))
}

/// The first `limit` bytes of the object at `path` (fewer if it is shorter), with what describes it. A short
/// prefix is a ranged GET; a long one (a whole session, bounded) a plain GET whose body is read only up to
/// `limit` (a server slicing a range out of a large object may copy it, and the bound holds either way).
async fn read_object_prefix(
    store: &AmazonS3,
    path: &ObjectPath,
    limit: usize,
) -> object_store::Result<(object_store::ObjectMeta, bytes::Bytes)> {
    const RANGED_UP_TO: usize = 1 << 20;
    let options = if limit <= RANGED_UP_TO {
        let end = u64::try_from(limit).unwrap_or(u64::MAX);
        GetOptions::new().with_range(Some(GetRange::Bounded(0..end)))
    } else {
        GetOptions::new()
    };
    let result = store.get_opts(path, options).await?;
    let meta = result.meta.clone();
    let expected = usize::try_from(meta.size).unwrap_or(usize::MAX).min(limit);
    let mut out = Vec::with_capacity(expected);
    let mut body = result.into_stream();
    while out.len() < limit {
        let Some(piece) = body.try_next().await? else {
            break;
        };
        let take = piece.len().min(limit - out.len());
        out.extend_from_slice(&piece[..take]);
    }
    Ok((meta, bytes::Bytes::from(out)))
}

/// The version an object's description names, for a conditional write that must find it.
fn version_of(meta: object_store::ObjectMeta) -> UpdateVersion {
    UpdateVersion {
        e_tag: meta.e_tag,
        version: meta.version,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// The longest a lease can hold a key after it was written, whatever it says: a holder whose clock runs far
/// ahead (or junk in the bucket) cannot lock a key for longer.
const LONGEST_LEASE: Duration = Duration::from_secs(600);

/// When the lease `content` expires: the time it names, or, for content that is not a lease of this
/// library, [`DEFAULT_LEASE`] after it was written (`modified`); never later than [`LONGEST_LEASE`] after.
fn lease_expiry(content: &[u8], modified: u64) -> u64 {
    let stated = std::str::from_utf8(content)
        .ok()
        .and_then(|text| text.split_once(' '))
        .and_then(|(_, expires)| expires.parse::<u64>().ok())
        .unwrap_or_else(|| modified.saturating_add(millis(DEFAULT_LEASE)));
    stated.min(modified.saturating_add(millis(LONGEST_LEASE)))
}

/// The token of the lease `content` (its first word).
fn lease_token(content: &[u8]) -> Option<&[u8]> {
    content
        .split(|&b| b == b' ')
        .next()
        .filter(|t| !t.is_empty())
}

/// A held lease; dropping it deletes the lease object (if it is still this holder's).
struct S3Lease {
    store: S3Store,
    key: String,
    token: String,
}

impl Drop for S3Lease {
    fn drop(&mut self) {
        {
            let mut leases = lock(&self.store.leases);
            if leases.get(&self.key).map(|held| held.token.as_str()) == Some(self.token.as_str()) {
                leases.remove(&self.key);
            }
        }
        // Delete the lease only if it is still this holder's: read it, and delete exactly that version. An
        // object store deletes unconditionally, so a lease taken over between the read and the delete is
        // removed too; its holder's writes stay fenced by the value's version, so nothing is lost, and the
        // lock is free again at once rather than at expiry. An unreachable store cannot be told: the lease
        // then runs out by itself.
        let path = self.store.lease_path(&self.key);
        let options = GetOptions::new().with_range(Some(GetRange::Bounded(0..LEASE_READ_LIMIT)));
        let current = self.store.run("unlock", async {
            self.store
                .store
                .get_opts(&path, options)
                .await?
                .bytes()
                .await
        });
        let ours =
            current.is_ok_and(|content| lease_token(&content) == Some(self.token.as_bytes()));
        if ours {
            let _ = self.store.run("unlock", self.store.store.delete(&path));
        }
    }
}

impl StoreLock for S3Lease {}

impl SessionStore for S3Store {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.value_path(key);
        let read = self.run_raw("read", read_object(&self.store, &path, GetOptions::new()))?;
        self.settle_read(key, read)
            .map_err(|e| self.error("read", e))
    }

    fn get_prefix(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        let path = self.value_path(key);
        let read = if len == 0 {
            self.run_raw("read", async {
                Ok((self.store.head(&path).await?, bytes::Bytes::new()))
            })?
        } else {
            self.run_raw("read", read_object_prefix(&self.store, &path, len))?
        };
        match self.settle_read(key, read) {
            Ok(value) => Ok(value),
            // S3 refuses any range of an empty object (416): that is an empty prefix, not a failure.
            Err(e) => match self.run_raw("read", self.store.head(&path))? {
                Ok(meta) if meta.size == 0 => self
                    .settle_read(key, Ok((meta, bytes::Bytes::new())))
                    .map_err(|e| self.error("read", e)),
                _ => Err(self.error("read", e)),
            },
        }
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let path = self.value_path(key);
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(value));
        let fence = lock(&self.leases)
            .get(key)
            .filter(|held| held.held_here())
            .map(|held| held.value.clone());
        let Some(expected) = fence else {
            self.run("write", self.store.put(&path, payload))?;
            return Ok(());
        };
        // Under a lease: replace only the version this holder last saw, or create only if there was none.
        let mode = match expected {
            Some(version) => PutMode::Update(version),
            None => PutMode::Create,
        };
        match self.run_raw(
            "write",
            self.store.put_opts(&path, payload, PutOptions::from(mode)),
        )? {
            Ok(written) => {
                self.saw(
                    key,
                    Some(UpdateVersion::from(written)),
                );
                Ok(())
            }
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                Err(self.error(
                    "write",
                    format!(
                        "{key:?} was written by someone else since this worker read it under its lease \
                         (the lease ran out, and another worker may hold it now); nothing was written"
                    ),
                ))
            }
            Err(e) => Err(self.error("write", e)),
        }
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let path = self.value_path(key);
        let existed = match self.run_raw("delete", self.store.head(&path))? {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(self.error("delete", e)),
        };
        if existed {
            self.run("delete", self.store.delete(&path))?;
        }
        self.saw(key, None);
        Ok(existed)
    }

    fn list(&self) -> Result<Vec<StoreEntry>> {
        let prefix = self.folder(self.values);
        let objects = self.run(
            "list",
            self.store.list(Some(&prefix)).try_collect::<Vec<_>>(),
        )?;
        let depth = prefix.parts().count() + 1;
        Ok(objects
            .into_iter()
            .filter(|meta| meta.location.parts().count() == depth)
            .filter_map(|meta| {
                let name = meta.location.filename()?;
                let key = percent_encoding::percent_decode_str(name)
                    .decode_utf8()
                    .ok()?
                    .into_owned();
                let modified = u64::try_from(meta.last_modified.timestamp_millis())
                    .ok()
                    .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
                Some(StoreEntry {
                    key,
                    size: meta.size,
                    modified,
                })
            })
            .collect())
    }

    fn lock(&self, key: &str) -> Result<Box<dyn StoreLock>> {
        let token = crate::redis_store::new_token();
        let mut wait = Duration::from_millis(10);
        while !self.try_lease(key, &token)? {
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(200));
        }
        // Held from here: release it on every path out, failures included.
        let lease = S3Lease {
            store: self.clone(),
            key: key.to_owned(),
            token: token.clone(),
        };
        let value = self.value_version(key)?;
        lock(&self.leases).insert(
            key.to_owned(),
            HeldLease {
                token,
                holder: std::thread::current().id(),
                value,
            },
        );
        Ok(Box::new(lease))
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
    fn a_lease_expires_when_it_says_or_a_default_time_after_junk_was_written() {
        assert_eq!(lease_expiry(b"abc 1234", 0), 1234);
        let default = millis(DEFAULT_LEASE);
        assert_eq!(lease_expiry(b"junk", 1000), 1000 + default);
        assert_eq!(lease_expiry(b"abc notanumber", 5), 5 + default);
        assert_eq!(lease_expiry(b"\xff\xfe 12", 7), 7 + default);
        // A lease written by a clock far ahead holds at most LONGEST_LEASE after it was written.
        assert_eq!(
            lease_expiry(format!("abc {}", u64::MAX).as_bytes(), 1000),
            1000 + millis(LONGEST_LEASE)
        );
        assert_eq!(lease_token(b"abc 12"), Some(&b"abc"[..]));
        assert_eq!(lease_token(b""), None);
    }
}
