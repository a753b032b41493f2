//! The checkpoint store: where snapshots and manifests live, behind [`object_store`], so a
//! local folder and (later) an object store share one code path.
//!
//! Layout (format version 1, documented in `docs/checkpoints.md`):
//! ```text
//! <root>/<job>/chk-0000000042/MANIFEST            written last, atomically (temp file + rename)
//! <root>/<job>/chk-0000000042/<task>/<step>.<role>.arrow   one Arrow IPC file per state table
//! ```
//! The manifest is JSON followed by a trailer line `#xxh3=<16 hex digits>` holding the
//! checksum of the JSON; it lists every state file with its size and checksum. A checkpoint is
//! complete when its manifest exists and everything checks out; anything else is skipped with
//! a warning and never loaded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_array::RecordBatch;
use futures::TryStreamExt as _;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use crate::checkpoint::{recover, Epoch, Manifest, Recovery, SnapshotRef, StateFile, StateRole, Stored, TaskKey};
use crate::error::{Blame, CoreError, Result, Retry};
use crate::state::{checksum, decode, encode};

/// The format name written in every manifest.
pub const FORMAT: &str = "weir-checkpoint";
/// The manifest format version this build writes and reads.
pub const VERSION: u32 = 1;

const TRAILER: &str = "\n#xxh3=";

/// A manifest as stored: the protocol's [`Manifest`] plus what a reader needs to know.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestFile {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version.
    pub version: u32,
    /// The job (pipeline name).
    pub job: String,
    /// The epoch.
    pub epoch: Epoch,
    /// When the manifest was written, ms since the epoch.
    pub created_ms: i64,
    /// Workers of the run that wrote it (state can be restored at any count).
    pub workers: usize,
    /// The input was consumed and every window flushed: a restart has nothing left to do.
    pub drained: bool,
    /// Every task's state files and watermarks.
    pub tasks: BTreeMap<TaskKey, SnapshotRef>,
}

impl ManifestFile {
    /// Total bytes of the state files.
    pub fn state_bytes(&self) -> u64 {
        self.files().map(|(_, f)| f.bytes).sum()
    }

    /// Every state file with its task.
    pub fn files(&self) -> impl Iterator<Item = (&TaskKey, &StateFile)> {
        self.tasks.iter().flat_map(|(t, s)| s.files.iter().map(move |f| (t, f)))
    }

    fn render(&self) -> Result<Vec<u8>> {
        let body = serde_json::to_string_pretty(self)
            .map_err(|e| CoreError::Internal(format!("manifest does not serialize: {e}")))?;
        Ok(format!("{body}{TRAILER}{:016x}\n", checksum(body.as_bytes())).into_bytes())
    }

    /// Parses a stored manifest, checking its checksum.
    ///
    /// # Errors
    /// A missing or wrong checksum (a torn or edited file), bad JSON, another format or version.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|_| corrupt("manifest is not UTF-8"))?;
        let Some(at) = text.rfind(TRAILER) else { return Err(corrupt("manifest has no checksum trailer")) };
        let (body, trailer) = (&text[..at], text[at + TRAILER.len()..].trim_end());
        let want = u64::from_str_radix(trailer, 16).map_err(|_| corrupt("manifest checksum is not hex"))?;
        if checksum(body.as_bytes()) != want {
            return Err(corrupt("manifest checksum does not match its content"));
        }
        let m: Self = serde_json::from_str(body).map_err(|e| corrupt(&format!("manifest is not valid: {e}")))?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(corrupt(&format!(
                "manifest is format `{}` version {}; this build reads `{FORMAT}` version {VERSION}",
                m.format, m.version
            )));
        }
        Ok(m)
    }
}

/// The object store at `location` and the prefix inside it.
fn connect(location: &str, options: &BTreeMap<String, String>) -> Result<(Arc<dyn ObjectStore>, Path)> {
    if location.contains("://") {
        from_url(location, options)
    } else {
        if !options.is_empty() {
            return Err(CoreError::Config(format!(
                "checkpoint store `{location}` is a directory; `options` apply only to a URL such as s3://bucket/prefix"
            )));
        }
        std::fs::create_dir_all(location)
            .map_err(|e| CoreError::io(format!("cannot create checkpoint directory `{location}`"), e))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(location)
            .map_err(|e| store_err(format!("checkpoint directory `{location}`"), e))?;
        Ok((Arc::new(fs), Path::default()))
    }
}

/// A local job folder `a/b/job` as (`a/b`, `job`); a bare `job` is under `.`.
fn split_dir(location: &str) -> (&str, &str) {
    match location.rsplit_once('/') {
        Some(("", job)) => ("/", job),
        Some((parent, job)) => (parent, job),
        None => (".", location),
    }
}

/// Opens an object store by URL. Only `s3` needs building by hand: `parse_url_opts` would
/// ignore the `AWS_*` environment, which is how deployments pass credentials.
fn from_url(location: &str, options: &BTreeMap<String, String>) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let url = url::Url::parse(location)
        .map_err(|e| CoreError::Config(format!("checkpoint store `{location}` is not a valid URL: {e}")))?;
    match url.scheme() {
        "s3" | "s3a" => {
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(location);
            for (k, v) in options {
                let key = k.to_ascii_lowercase();
                let key = if key.starts_with("aws_") { key } else { format!("aws_{key}") };
                let key: object_store::aws::AmazonS3ConfigKey = key.parse().map_err(|_| {
                    CoreError::Config(format!(
                        "checkpoint store `{location}`: unknown S3 option `{k}` (e.g. endpoint, region, allow_http, access_key_id)"
                    ))
                })?;
                b = b.with_config(key, v.clone());
            }
            let s = b.build().map_err(|e| store_err(format!("checkpoint store `{location}`"), e))?;
            let prefix = Path::from_url_path(url.path())
                .map_err(|e| CoreError::Config(format!("checkpoint store `{location}`: bad path: {e}")))?;
            Ok((Arc::new(s), prefix))
        }
        _ => {
            let opts: Vec<(String, String)> = options.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let (s, p) = object_store::parse_url_opts(&url, opts).map_err(|e| {
                CoreError::Config(format!(
                    "checkpoint store `{location}`: {e} (this build supports a directory, file://, memory:// and s3://)"
                ))
            })?;
            Ok((Arc::from(s), p))
        }
    }
}

fn corrupt(what: &str) -> CoreError {
    CoreError::Other { message: what.to_string(), blame: Blame::External, retry: Retry::Never }
}

fn store_err(what: impl std::fmt::Display, e: object_store::Error) -> CoreError {
    let retry = match e {
        object_store::Error::NotFound { .. } | object_store::Error::InvalidPath { .. } => Retry::Never,
        _ => Retry::Backoff,
    };
    CoreError::Other { message: format!("{what}: {e}"), blame: Blame::External, retry }
}

/// State loaded from a complete checkpoint, ready to hand to the tasks of a new run.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// The checkpoint restored.
    pub epoch: Option<Epoch>,
    /// It was written after the input was consumed.
    pub drained: bool,
    /// Operator state tables by step id, from every task of the old run.
    pub operators: HashMap<String, Vec<RecordBatch>>,
    /// Source position tables by step id.
    pub sources: HashMap<String, Vec<RecordBatch>>,
    /// The lowest watermark any old task had reached, by step id.
    pub watermarks: HashMap<String, i64>,
    /// When the checkpoint's manifest was written, ms since the epoch.
    pub created_ms: Option<i64>,
    /// State of partitions this member no longer holds, carried in its checkpoints until
    /// another member takes them (see [`crate::handoff`]): source positions and operator
    /// tables by step, and the watermarks as of when they were held.
    pub parked: Parked,
}

/// The task key under which a checkpoint carries parked partitions (see [`Restored::parked`]).
pub const PARKED_TASK: &str = "parked";

/// State of partitions a member handed on, as its checkpoints carry it.
#[derive(Debug, Clone, Default)]
pub struct Parked {
    /// Source position tables by step id.
    pub sources: HashMap<String, Vec<RecordBatch>>,
    /// Operator state tables by step id.
    pub operators: HashMap<String, Vec<RecordBatch>>,
    /// Watermarks by step id, as of the checkpoint the state comes from.
    pub watermarks: BTreeMap<String, i64>,
}

impl Parked {
    /// Nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.operators.is_empty()
    }
}

impl Restored {
    fn from_checkpoint(m: ManifestFile, tables: Vec<(StateFile, RecordBatch)>) -> Self {
        let mut restored = Restored {
            epoch: Some(m.epoch),
            drained: m.drained,
            created_ms: Some(m.created_ms),
            ..Restored::default()
        };
        let parked_files: std::collections::HashSet<String> = m
            .tasks
            .get(&TaskKey(PARKED_TASK.into()))
            .map(|s| s.files.iter().map(|f| f.path.clone()).collect())
            .unwrap_or_default();
        for (task, snap) in &m.tasks {
            if task.0 == PARKED_TASK {
                restored.parked.watermarks.clone_from(&snap.watermarks);
                continue;
            }
            for (step, wm) in &snap.watermarks {
                let e = restored.watermarks.entry(step.clone()).or_insert(*wm);
                *e = (*e).min(*wm);
            }
        }
        for (f, t) in tables {
            let parked = parked_files.contains(&f.path);
            let map = match (f.role, parked) {
                (StateRole::Source, false) => &mut restored.sources,
                (StateRole::Operator, false) => &mut restored.operators,
                (StateRole::Source, true) => &mut restored.parked.sources,
                (StateRole::Operator, true) => &mut restored.parked.operators,
            };
            map.entry(f.step).or_default().push(t);
        }
        restored
    }
}

/// What is in the store for a job, newest first, as `weir checkpoints list` shows it.
#[derive(Debug)]
pub struct Listed {
    /// The epoch.
    pub epoch: Epoch,
    /// The manifest, or why it cannot be used (missing, torn, corrupt, or naming a bad file).
    pub manifest: Result<ManifestFile>,
}

/// A job's checkpoints in an object store.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
    location: String,
    /// With several processes sharing the store: this one's name, and the job folder that
    /// holds every member's folder.
    member: Option<(String, Path)>,
}

impl CheckpointStore {
    /// Opens the store at `location` for `job`: a directory (created if missing), or a
    /// `file://`, `memory://` or `s3://bucket/prefix` URL (see [`CheckpointStore::open_with`]).
    ///
    /// # Errors
    /// A directory that cannot be created, or a URL this build does not support.
    pub fn open(location: &str, job: &str) -> Result<Self> {
        Self::open_with(location, job, &BTreeMap::new())
    }

    /// Opens the store at `location` for `job` with object-store `options`.
    ///
    /// An `s3://` URL reaches any S3-compatible service (AWS, MinIO, Ceph, R2, or GCS through
    /// its S3 interoperability API). Its settings come from the usual `AWS_*` environment
    /// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`,
    /// `AWS_ALLOW_HTTP`, ...), and `options` (the same names, lower case, with or without the
    /// `aws_` prefix) win over them. Options are never logged: they may hold secrets.
    ///
    /// # Errors
    /// A directory that cannot be created, an unknown option, or a URL this build does not support.
    pub fn open_with(location: &str, job: &str, options: &BTreeMap<String, String>) -> Result<Self> {
        let (store, prefix) = connect(location, options)?;
        let root = prefix.clone().join(job);
        Ok(Self { store, root, location: location.to_string(), member: None })
    }

    /// The jobs that have checkpoints at `location` (the pipeline folders holding `chk-*`, or
    /// their members' folders holding them), sorted; or, when `location` is itself one job's folder, that job, with its parent as
    /// the location. Directories and URLs alike.
    ///
    /// # Errors
    /// A location that cannot be opened or listed.
    pub async fn discover(location: &str, options: &BTreeMap<String, String>) -> Result<Vec<Self>> {
        let location = location.trim_end_matches('/');
        if !location.contains("://") && !std::path::Path::new(location).is_dir() {
            return Err(CoreError::Config(format!("`{location}` is not a directory")));
        }
        let (store, base) = connect(location, options)?;
        let holds = |listing: &object_store::ListResult| {
            listing.common_prefixes.iter().any(|p| p.filename().is_some_and(|f| f.starts_with("chk-")))
        };
        let list = |p: Path| {
            let store = store.clone();
            async move {
                store
                    .list_with_delimiter(Some(&p))
                    .await
                    .map_err(|e| store_err(format!("listing checkpoints in `{location}`"), e))
            }
        };
        let top = list(base.clone()).await?;
        if holds(&top) {
            let (parent, job) = split_dir(location);
            return Ok(vec![Self::open_with(parent, job, options)?]);
        }
        let mut out = Vec::new();
        for p in &top.common_prefixes {
            let Some(job) = p.filename() else { continue };
            let inside = list(p.clone()).await?;
            if holds(&inside) {
                out.push(Self::open_with(location, job, options)?);
                continue;
            }
            // Several processes' folders (`checkpoints.member`), one level down.
            for m in &inside.common_prefixes {
                let Some(member) = m.filename() else { continue };
                if holds(&list(m.clone()).await?) {
                    out.push(Self::open_with(location, job, options)?.member(member)?);
                }
            }
        }
        out.sort_by(|a, b| a.root.as_ref().cmp(b.root.as_ref()));
        Ok(out)
    }

    /// The folder of one member of several processes that share `location` and split their
    /// input (see [`crate::handoff`]): `<location>/<job>/<name>`.
    ///
    /// # Errors
    /// A name that is empty or holds `/`.
    pub fn member(mut self, name: &str) -> Result<Self> {
        crate::ensure_config!(
            !name.is_empty() && !name.contains('/') && name != "." && name != "..",
            "checkpoints: `member` must be a plain name (got `{name}`)"
        );
        let job_root = self.root.clone();
        self.root = job_root.clone().join(name);
        self.member = Some((name.to_string(), job_root));
        Ok(self)
    }

    /// This process's member name, when it is one of several (see [`CheckpointStore::member`]).
    pub fn member_name(&self) -> Option<&str> {
        self.member.as_ref().map(|(n, _)| n.as_str())
    }

    /// The other members' stores next to this one (folders with a member record), sorted.
    ///
    /// # Errors
    /// Store failures while listing.
    pub async fn peers(&self) -> Result<Vec<Self>> {
        let Some((me, job_root)) = &self.member else { return Ok(Vec::new()) };
        let listing = self
            .store
            .list_with_delimiter(Some(job_root))
            .await
            .map_err(|e| store_err(format!("listing the members in `{}`", self.location), e))?;
        let mut out = Vec::new();
        for p in &listing.common_prefixes {
            let Some(name) = p.filename() else { continue };
            if name == me {
                continue;
            }
            let mut peer = self.clone();
            peer.root = job_root.clone().join(name);
            peer.member = Some((name.to_string(), job_root.clone()));
            if peer.member_record().await?.is_some() {
                out.push(peer);
            }
        }
        out.sort_by(|a, b| a.root.as_ref().cmp(b.root.as_ref()));
        Ok(out)
    }

    /// Records what other members need to settle this member's output (the sink's
    /// [`crate::SinkFactory::member_record`]), in `<member>/MEMBER`.
    ///
    /// # Errors
    /// Store failures.
    pub async fn put_member_record(&self, record: &serde_json::Value) -> Result<()> {
        let path = self.root.clone().join("MEMBER");
        let body = serde_json::to_vec_pretty(record).map_err(|e| CoreError::Internal(format!("member record: {e}")))?;
        self.store
            .put(&path, PutPayload::from(body))
            .await
            .map_err(|e| store_err(format!("writing member record `{path}`"), e))?;
        Ok(())
    }

    /// The member record, if this member has written one.
    ///
    /// # Errors
    /// Store failures, or a record that is not JSON.
    pub async fn member_record(&self) -> Result<Option<serde_json::Value>> {
        let path = self.root.clone().join("MEMBER");
        match self.store.get(&path).await {
            Ok(got) => {
                let bytes = got.bytes().await.map_err(|e| store_err(format!("reading `{path}`"), e))?;
                serde_json::from_slice(&bytes).map(Some).map_err(|e| corrupt(&format!("member record `{path}`: {e}")))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(format!("reading `{path}`"), e)),
        }
    }

    /// The newest complete checkpoint at or before `through` (any, without it), loaded,
    /// changing nothing: how another member reads this one's checkpoints.
    ///
    /// # Errors
    /// Store failures (not bad checkpoints: those are skipped).
    pub async fn newest(&self, through: Option<Epoch>) -> Result<Option<Restored>> {
        for e in self.epochs().await?.into_iter().rev() {
            if through.is_some_and(|t| e > t) {
                continue;
            }
            match self.load(e).await {
                Ok((m, tables)) => return Ok(Some(Restored::from_checkpoint(m, tables))),
                Err(err) => {
                    tracing::debug!(checkpoint = e.0, store = %self.root, error = %err, "Skipping a checkpoint that is partial or corrupt.")
                }
            }
        }
        Ok(None)
    }

    /// The job (pipeline) this store holds checkpoints of.
    pub fn job(&self) -> &str {
        match &self.member {
            Some((_, job_root)) => job_root.filename().unwrap_or_default(),
            None => self.root.filename().unwrap_or_default(),
        }
    }

    /// Where the store is, as configured.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn dir(&self, epoch: Epoch) -> Path {
        self.root.clone().join(format!("chk-{:010}", epoch.0))
    }

    /// Writes one state table of a task's snapshot.
    ///
    /// # Errors
    /// Encoding or store failures.
    pub async fn put_state(
        &self,
        epoch: Epoch,
        task: &TaskKey,
        step: &str,
        role: StateRole,
        table: &RecordBatch,
    ) -> Result<StateFile> {
        let bytes = encode(table)?;
        let suffix = match role {
            StateRole::Source => "source",
            StateRole::Operator => "operator",
        };
        let rel = format!("{}/{step}.{suffix}.arrow", task.0);
        let file = StateFile {
            step: step.to_string(),
            role,
            path: rel.clone(),
            bytes: bytes.len() as u64,
            checksum: checksum(&bytes),
            rows: table.num_rows() as u64,
        };
        let path = self.dir(epoch).join_parts_of(&rel);
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| store_err(format!("writing checkpoint state `{path}`"), e))?;
        Ok(file)
    }

    /// Writes the manifest, which makes the checkpoint complete.
    ///
    /// # Errors
    /// Store failures.
    pub async fn put_manifest(&self, m: &Manifest, job: &str, workers: usize, drained: bool) -> Result<ManifestFile> {
        let file = ManifestFile {
            format: FORMAT.into(),
            version: VERSION,
            job: job.into(),
            epoch: m.epoch,
            created_ms: crate::deadletter::now_ms(),
            workers,
            drained,
            tasks: m.tasks.clone(),
        };
        let path = self.dir(m.epoch).join("MANIFEST");
        self.store
            .put(&path, PutPayload::from(file.render()?))
            .await
            .map_err(|e| store_err(format!("writing checkpoint manifest `{path}`"), e))?;
        Ok(file)
    }

    /// Epochs that have a folder in the store, oldest first.
    ///
    /// # Errors
    /// Store failures.
    pub async fn epochs(&self) -> Result<Vec<Epoch>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.root))
            .await
            .map_err(|e| store_err(format!("listing checkpoints in `{}`", self.location), e))?;
        let mut out: Vec<Epoch> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename()?.strip_prefix("chk-")?.parse().ok())
            .map(Epoch)
            .collect();
        out.sort();
        Ok(out)
    }

    /// Reads and checks the manifest of `epoch`, and every state file it names.
    ///
    /// # Errors
    /// A missing, torn or corrupt manifest or state file, named.
    pub async fn load(&self, epoch: Epoch) -> Result<(ManifestFile, Vec<(StateFile, RecordBatch)>)> {
        let dir = self.dir(epoch);
        let bytes = self.read(&dir.clone().join("MANIFEST")).await?;
        let m = ManifestFile::parse(&bytes).map_err(|e| corrupt(&format!("checkpoint {epoch}: {e}")))?;
        if m.epoch != epoch {
            return Err(corrupt(&format!("checkpoint {epoch}: its manifest says epoch {}", m.epoch)));
        }
        let mut tables = Vec::new();
        for (_, f) in m.files() {
            let path = dir.clone().join_parts_of(&f.path);
            let bytes = self.read(&path).await?;
            if bytes.len() as u64 != f.bytes || checksum(&bytes) != f.checksum {
                return Err(corrupt(&format!(
                    "checkpoint {epoch}: state file `{}` is {} bytes with checksum {:016x}; the manifest says {} bytes, {:016x}",
                    f.path,
                    bytes.len(),
                    checksum(&bytes),
                    f.bytes,
                    f.checksum
                )));
            }
            let t = decode(&bytes).map_err(|e| corrupt(&format!("checkpoint {epoch}: `{}`: {e}", f.path)))?;
            tables.push((f.clone(), t));
        }
        Ok((m, tables))
    }

    async fn read(&self, path: &Path) -> Result<bytes::Bytes> {
        let got = self.store.get(path).await.map_err(|e| store_err(format!("reading `{path}`"), e))?;
        got.bytes().await.map_err(|e| store_err(format!("reading `{path}`"), e))
    }

    /// Every checkpoint, newest first, each checked.
    ///
    /// # Errors
    /// Store failures while listing.
    pub async fn list(&self) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        for e in self.epochs().await?.into_iter().rev() {
            out.push(Listed { epoch: e, manifest: self.load(e).await.map(|(m, _)| m) });
        }
        Ok(out)
    }

    /// Deletes a checkpoint's files.
    ///
    /// # Errors
    /// Store failures.
    pub async fn delete(&self, epoch: Epoch) -> Result<()> {
        let dir = self.dir(epoch);
        let files: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| store_err(format!("listing checkpoint {epoch}"), e))?;
        // The manifest goes first, so a crash half-way leaves an incomplete checkpoint, which
        // is skipped, rather than a manifest naming missing files.
        let (manifest, rest): (Vec<_>, Vec<_>) =
            files.into_iter().partition(|f| f.location.filename() == Some("MANIFEST"));
        for f in manifest.into_iter().chain(rest) {
            match self.store.delete(&f.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(format!("deleting `{}`", f.location), e)),
            }
        }
        // Local folders are left behind by object_store; tidy them (best effort).
        if let Some(dir) = self.local_dir(epoch) {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }

    /// Takes the job's lock in a local store, so two runs of one pipeline cannot interleave
    /// their checkpoints; held until the returned file is dropped. Object stores have no
    /// lock: running one pipeline twice against one is the deployer's mistake to avoid.
    ///
    /// # Errors
    /// Another process holds the lock, or the lock file cannot be created.
    pub fn lock(&self) -> Result<Option<std::fs::File>> {
        if self.location.contains("://") {
            return Ok(None);
        }
        let dir = std::path::Path::new(&self.location).join(self.root.as_ref());
        std::fs::create_dir_all(&dir)
            .map_err(|e| CoreError::io(format!("cannot create checkpoint directory `{}`", dir.display()), e))?;
        let path = dir.join("LOCK");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CoreError::io(format!("cannot open `{}`", path.display()), e))?;
        match f.try_lock() {
            Ok(()) => Ok(Some(f)),
            Err(std::fs::TryLockError::WouldBlock) => Err(CoreError::Config(format!(
                "another run of this pipeline is using the checkpoints in `{}` (it holds `{}`)",
                self.location,
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(CoreError::io(format!("cannot lock `{}`", path.display()), e)),
        }
    }

    fn local_dir(&self, epoch: Epoch) -> Option<std::path::PathBuf> {
        if self.location.contains("://") {
            return None;
        }
        Some(std::path::Path::new(&self.location).join(self.dir(epoch).as_ref()))
    }

    /// Decides what to restore and loads it; deletes checkpoints that are partial or corrupt
    /// and newer than the one restored, with a warning each. With `through`, checkpoints
    /// after it are deleted too, complete or not: the sink never made their output visible
    /// (see [`crate::Committer::visible`]), so their input must be processed again.
    ///
    /// # Errors
    /// Store failures (not bad checkpoints: those are skipped).
    pub async fn recover(&self, through: Option<Epoch>) -> Result<(Recovery, Restored)> {
        let mut epochs = self.epochs().await?;
        if let Some(limit) = through {
            for &e in epochs.iter().filter(|e| **e > limit) {
                tracing::warn!(
                    checkpoint = e.0,
                    visible_through = limit.0,
                    "A checkpoint completed, but the sink never made its output visible (a crash came between the two); it is dropped and its input processed again."
                );
                self.delete(e).await?;
            }
            epochs.retain(|e| *e <= limit);
        }
        let mut stored = Vec::new();
        let mut loaded = None;
        for &e in epochs.iter().rev() {
            if loaded.is_some() {
                // Older than the one restored: kept for retention, not checked now.
                stored.push(Stored { epoch: e, manifest: true, valid: true });
                continue;
            }
            match self.load(e).await {
                Ok(l) => {
                    stored.push(Stored { epoch: e, manifest: true, valid: true });
                    loaded = Some(l);
                }
                Err(err) => {
                    tracing::warn!(checkpoint = e.0, error = %err, "Skipping a checkpoint that is partial or corrupt.");
                    stored.push(Stored { epoch: e, manifest: false, valid: false });
                }
            }
        }
        let plan = recover(&stored);
        for e in &plan.discard {
            self.delete(*e).await?;
        }
        let restored = loaded.map(|(m, t)| Restored::from_checkpoint(m, t)).unwrap_or_default();
        Ok((plan, restored))
    }
}

/// Joins a relative `a/b/c` path part by part (object_store paths refuse `/` inside a part).
trait JoinParts {
    fn join_parts_of(self, rel: &str) -> Path;
}

impl JoinParts for Path {
    fn join_parts_of(self, rel: &str) -> Path {
        rel.split('/').filter(|p| !p.is_empty()).fold(self, |p, part| p.join(part))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array, UInt32Array};
    use arrow_schema::{DataType, Field};

    use super::*;
    use crate::state::state_table;

    fn table(n: i64) -> RecordBatch {
        let v: ArrayRef = Arc::new(Int64Array::from((0..n).collect::<Vec<_>>()));
        state_table(UInt32Array::from(vec![0; n as usize]), vec![Field::new("v", DataType::Int64, false)], vec![v])
            .unwrap()
    }

    async fn checkpoint(s: &CheckpointStore, e: u64) -> Manifest {
        let task = TaskKey("s0-w0".into());
        let f = s.put_state(Epoch(e), &task, "win", StateRole::Operator, &table(e as i64)).await.unwrap();
        let mut snap = SnapshotRef { files: vec![f], watermarks: BTreeMap::new() };
        snap.watermarks.insert("win".into(), e as i64 * 1000);
        let m = Manifest { epoch: Epoch(e), tasks: [(task, snap)].into_iter().collect() };
        s.put_manifest(&m, "job", 1, false).await.unwrap();
        m
    }

    #[tokio::test]
    async fn restores_the_newest_complete_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = CheckpointStore::open(dir.path().to_str().unwrap(), "job").unwrap();
        checkpoint(&s, 1).await;
        checkpoint(&s, 2).await;
        // Epoch 3 got its state written but crashed before the manifest.
        let task = TaskKey("s0-w0".into());
        s.put_state(Epoch(3), &task, "win", StateRole::Operator, &table(3)).await.unwrap();
        let (plan, restored) = s.recover(None).await.unwrap();
        assert_eq!(plan.restore, Some(Epoch(2)));
        assert_eq!(plan.discard, vec![Epoch(3)]);
        assert_eq!(restored.operators["win"][0].num_rows(), 2);
        assert_eq!(restored.watermarks["win"], 2000);
        assert_eq!(s.epochs().await.unwrap(), vec![Epoch(1), Epoch(2)], "the partial checkpoint is deleted");
        let held = s.lock().unwrap();
        assert!(held.is_some());
        let err = s.lock().unwrap_err().to_string();
        assert!(err.contains("another run"), "{err}");
        drop(held);
        assert!(s.lock().unwrap().is_some());
    }

    /// A sink that made output visible only through checkpoint 1 (its commit of 2 died with
    /// the process): checkpoint 2 is complete, but recovery restores 1 and drops 2.
    #[tokio::test]
    async fn a_complete_checkpoint_beyond_what_the_sink_made_visible_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = CheckpointStore::open(dir.path().to_str().unwrap(), "job").unwrap();
        checkpoint(&s, 1).await;
        checkpoint(&s, 2).await;
        let (plan, restored) = s.recover(Some(Epoch(1))).await.unwrap();
        assert_eq!((plan.restore, plan.commit, restored.epoch), (Some(Epoch(1)), Some(Epoch(1)), Some(Epoch(1))));
        assert_eq!(restored.operators["win"][0].num_rows(), 1);
        assert_eq!(s.epochs().await.unwrap(), vec![Epoch(1)], "checkpoint 2 is deleted");
        // Nothing visible yet: nothing is restored.
        let (plan, restored) = s.recover(Some(Epoch(0))).await.unwrap();
        assert_eq!((plan.restore, restored.epoch), (None, None));
        assert!(s.epochs().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_truncated_or_corrupted_file_is_refused_and_the_previous_checkpoint_used() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        let s = CheckpointStore::open(root, "job").unwrap();
        checkpoint(&s, 1).await;
        checkpoint(&s, 2).await;
        let state = dir.path().join("job/chk-0000000002/s0-w0/win.operator.arrow");
        let mut bytes = std::fs::read(&state).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&state, &bytes).unwrap();
        let listed = s.list().await.unwrap();
        let err = listed[0].manifest.as_ref().unwrap_err().to_string();
        assert!(err.contains("win.operator.arrow") && err.contains("checksum"), "{err}");
        let (plan, _) = s.recover(None).await.unwrap();
        assert_eq!(plan.restore, Some(Epoch(1)));

        // A torn manifest of a new checkpoint 2.
        checkpoint(&s, 2).await;
        let manifest = dir.path().join("job/chk-0000000002/MANIFEST");
        let text = std::fs::read(&manifest).unwrap();
        std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();
        let (plan, restored) = s.recover(None).await.unwrap();
        assert_eq!((plan.restore, restored.epoch), (Some(Epoch(1)), Some(Epoch(1))));
    }

    #[test]
    fn manifests_round_trip_and_name_their_damage() {
        let m = ManifestFile {
            format: FORMAT.into(),
            version: VERSION,
            job: "j".into(),
            epoch: Epoch(4),
            created_ms: 1,
            workers: 2,
            drained: false,
            tasks: BTreeMap::new(),
        };
        let bytes = m.render().unwrap();
        assert_eq!(ManifestFile::parse(&bytes).unwrap(), m);
        let edited = String::from_utf8(bytes.clone()).unwrap().replace("\"workers\": 2", "\"workers\": 3");
        assert!(ManifestFile::parse(edited.as_bytes()).unwrap_err().to_string().contains("does not match"));
        assert!(ManifestFile::parse(&bytes[..10]).unwrap_err().to_string().contains("trailer"));
    }

    #[tokio::test]
    async fn discovers_jobs_in_a_folder_or_the_job_folder_itself() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        for job in ["b", "a"] {
            checkpoint(&CheckpointStore::open(root, job).unwrap(), 1).await;
        }
        std::fs::create_dir(dir.path().join("not-a-job")).unwrap();
        let none = BTreeMap::new();
        let jobs: Vec<_> = CheckpointStore::discover(root, &none).await.unwrap();
        assert_eq!(jobs.iter().map(CheckpointStore::job).collect::<Vec<_>>(), ["a", "b"]);
        let one = CheckpointStore::discover(&format!("{root}/b/"), &none).await.unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].job(), one[0].location()), ("b", root));
        assert_eq!(one[0].epochs().await.unwrap(), vec![Epoch(1)]);
        let m = CheckpointStore::open(root, "shared").unwrap().member("pod-1").unwrap();
        checkpoint(&m, 4).await;
        let all = CheckpointStore::discover(root, &none).await.unwrap();
        let named: Vec<_> = all.iter().map(|s| (s.job(), s.member_name())).collect();
        assert_eq!(named, [("a", None), ("b", None), ("shared", Some("pod-1"))]);
        assert_eq!(all[2].epochs().await.unwrap(), vec![Epoch(4)]);
        let err = CheckpointStore::discover(&format!("{root}/missing"), &none).await.unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("not a directory"), "{err}");
    }

    #[tokio::test]
    async fn members_share_a_job_folder_and_read_each_other_without_changing_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        let a = CheckpointStore::open(root, "w1").unwrap().member("a").unwrap();
        let b = CheckpointStore::open(root, "w1").unwrap().member("b").unwrap();
        let c = CheckpointStore::open(root, "w1").unwrap().member("c").unwrap();
        for e in [1, 2, 3] {
            checkpoint(&b, e).await;
        }
        checkpoint(&c, 1).await;
        b.put_member_record(&serde_json::json!({ "member": "b", "sink": { "transactional_id": "t-b" } }))
            .await
            .unwrap();
        // `c` wrote no record: it is not (yet) a member others read.
        let peers = a.peers().await.unwrap();
        assert_eq!(peers.iter().map(|p| p.member_name().unwrap()).collect::<Vec<_>>(), ["b"]);
        assert_eq!((peers[0].job(), a.job()), ("w1", "w1"));
        assert_eq!(peers[0].member_record().await.unwrap().unwrap()["sink"]["transactional_id"], "t-b");
        assert_eq!(a.member_record().await.unwrap(), None);
        let newest = peers[0].newest(None).await.unwrap().unwrap();
        assert_eq!((newest.epoch, newest.watermarks["win"]), (Some(Epoch(3)), 3000));
        assert!(newest.created_ms.is_some());
        let visible = peers[0].newest(Some(Epoch(2))).await.unwrap().unwrap();
        assert_eq!(visible.epoch, Some(Epoch(2)));
        assert!(peers[0].newest(Some(Epoch(0))).await.unwrap().is_none());
        // Reading changed nothing: the newer checkpoint is still there for `b` itself.
        assert_eq!(b.epochs().await.unwrap(), vec![Epoch(1), Epoch(2), Epoch(3)]);
        assert!(CheckpointStore::open(root, "w1").unwrap().member("x/y").is_err());
    }

    #[test]
    fn store_options_are_checked() {
        let opts = |k: &str| [(k.to_string(), "x".to_string())].into_iter().collect::<BTreeMap<_, _>>();
        let dir = tempfile::tempdir().unwrap();
        let err = CheckpointStore::open_with(dir.path().to_str().unwrap(), "j", &opts("endpoint")).unwrap_err();
        assert!(err.to_string().contains("apply only to a URL"), "{err}");
        let err = CheckpointStore::open_with("s3://bucket/ck", "j", &opts("endpont")).unwrap_err().to_string();
        assert!(err.contains("unknown S3 option `endpont`"), "{err}");
        // Both spellings of a known option are taken; nothing is contacted until used.
        for k in ["region", "aws_region", "ENDPOINT"] {
            let s = CheckpointStore::open_with("s3://bucket/ck", "j", &opts(k)).unwrap();
            assert_eq!(s.job(), "j");
        }
        let err = CheckpointStore::open("ftp://host/ck", "j").unwrap_err().to_string();
        assert!(err.contains("s3://"), "{err}");
    }
}
