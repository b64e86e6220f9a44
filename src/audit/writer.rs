//! The audit writer thread: takes whatever has queued up, writes it to the
//! sink in one go (one `write` and, with `fsync: batch`, one fsync per
//! batch: group commit), then tells the waiting requests. When the sink
//! fails it spills or holds records and tries the sink again every
//! `retry`; the file sink rotates by size and age.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::runtime::Runtime;

use super::queue::{Msg, Take};
use super::{Pending, Shared};
use crate::config::{Audit, AuditSink, Fsync};

/// How long the writer lets records nobody waits for gather into one
/// write (request records; decision records are written at once).
const LINGER: Duration = Duration::from_millis(2);

/// How much room the file sink's probe asks the file system for: a
/// batch of typical records.
const PROBE_ROOM: u64 = 64 * 1024;

/// Errors that say the file system cannot take more (as opposed to "this
/// file system cannot tell", e.g. no `fallocate`).
fn no_room(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    [
        Errno::NOSPC,
        Errno::DQUOT,
        Errno::FBIG,
        Errno::ROFS,
        Errno::IO,
    ]
    .contains(&e)
}

/// A file records are appended to, opened on first use and again after a
/// failure (so a path that was unwritable can recover).
pub(super) struct AppendFile {
    pub(super) path: PathBuf,
    /// Shared with an fsync in progress outside the lock.
    file: Option<Arc<File>>,
    pub(super) size: u64,
    pub(super) opened: SystemTime,
    /// A rotation that failed is not tried again before this.
    rotate_after: Option<Instant>,
    /// The open file's device and inode: what the path must still name.
    ident: (u64, u64),
    /// The file was created and its directory's fsync failed: tried again
    /// at the next open.
    dir_unsynced: bool,
}

impl AppendFile {
    pub(super) fn new(path: PathBuf) -> AppendFile {
        AppendFile {
            path,
            file: None,
            size: 0,
            opened: SystemTime::now(),
            rotate_after: None,
            ident: (0, 0),
            dir_unsynced: false,
        }
    }

    /// Fsyncs the open file before it is let go (a write failed, or it was
    /// moved away): what was appended to it gets to the disk, or the loss
    /// is said.
    fn sync_before_leaving(&self) {
        if let Some(Err(e)) = self.file.as_ref().map(|f| f.sync_data()) {
            tracing::error!(
                error = %e,
                path = %self.path.display(),
                "audit: records appended to the file before it was let go could not be fsynced and may be lost"
            );
        }
    }

    /// Whether the open file is no longer the one at its path: moved or
    /// deleted by someone else (a logrotate of its own, a clean-up job).
    /// Records appended to it would go where nobody looks, or nowhere.
    /// A path that cannot be looked at for another reason says nothing.
    fn moved_away(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        if self.file.is_none() {
            return false;
        }
        match std::fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) != self.ident,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    /// Whether the open file has been deleted (no name links to it).
    fn unlinked(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.file
            .as_ref()
            .is_some_and(|f| f.metadata().is_ok_and(|m| m.nlink() == 0))
    }

    /// Opens the file at the path afresh (a new one after a rotation, or
    /// one moved away), its age counted from now.
    fn start_anew(&mut self) -> io::Result<()> {
        self.file = None;
        self.open()?;
        self.opened = SystemTime::now();
        Ok(())
    }

    /// Opens the file for appending. A last line torn by a crash is ended,
    /// so the next record starts on a line of its own.
    pub(super) fn open(&mut self) -> io::Result<&File> {
        self.open_within(LOCK_WAIT)
    }

    /// As [`AppendFile::open`], waiting at most `wait` for another
    /// process's lock on the file ([`Exclusive::take_within`]).
    fn open_within(&mut self, wait: Duration) -> io::Result<&File> {
        use std::os::unix::fs::MetadataExt;
        if self.file.is_none() {
            let existed = self.path.exists();
            // Records name patients, users and addresses: a new file is
            // the owner's and its group's (a log shipper), no one else's.
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .mode(0o640)
                .open(&self.path)?;
            if !existed || self.dir_unsynced {
                // The new name is durable only once its directory is.
                self.dir_unsynced = true;
                sync_dir(&self.path)?;
                self.dir_unsynced = false;
            }
            // Another process may be appending (a handover): its record
            // half written is no torn line to end.
            let alone = Exclusive::take_within(&f, &self.path, wait)?;
            let meta = f.metadata()?;
            self.ident = (meta.dev(), meta.ino());
            self.size = meta.len();
            self.opened = meta.created().unwrap_or_else(|_| SystemTime::now());
            if meta.is_file() && self.size > 0 {
                let mut last = [0u8; 1];
                (&f).seek(SeekFrom::Start(self.size - 1))?;
                (&f).read_exact(&mut last)?;
                if last[0] != b'\n' {
                    (&f).write_all(b"\n")?;
                    self.size += 1;
                }
            }
            drop(alone);
            self.file = Some(Arc::new(f));
        }
        Ok(self.file.as_deref().expect("just opened"))
    }

    /// Whether records can be appended: the file opens and the file
    /// system gives it room for [`PROBE_ROOM`] more bytes. Opening alone
    /// succeeds on a full disk, and the gateway would call itself ready
    /// while every record fails. The room is reserved past the end
    /// (`fallocate` keeping the size), so readers see nothing and the
    /// next records use it. File systems without `fallocate` (some
    /// network and FUSE ones) and files that are not regular (a FIFO,
    /// `/dev/stdout`) cannot tell: they pass on the open alone.
    pub(super) fn probe(&mut self) -> io::Result<()> {
        // Opened first: opening is what learns the size of a file that
        // exists (room below its end is allocated already and proves
        // nothing).
        self.open()?;
        let f = self.file.as_deref().expect("just opened");
        match rustix::fs::fallocate(
            f,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            self.size,
            PROBE_ROOM,
        ) {
            Ok(()) => Ok(()),
            Err(e) if no_room(e) => {
                self.file = None;
                Err(io::Error::from(e))
            }
            Err(_) => Ok(()),
        }
    }

    /// Appends records as lines with one `write` and fsyncs them.
    pub(super) fn append(&mut self, records: &[&Pending]) -> io::Result<()> {
        self.write(records)?;
        self.sync()
    }

    /// Appends records as lines with one `write` (no fsync).
    pub(super) fn write(&mut self, records: &[&Pending]) -> io::Result<()> {
        self.write_within(records, LOCK_WAIT)
    }

    /// As [`AppendFile::write`], waiting at most `wait` for another
    /// process's lock on the file (zero: one try, `WouldBlock` when it is
    /// held, nothing written): a request thread does not wait on it.
    pub(super) fn write_within(&mut self, records: &[&Pending], wait: Duration) -> io::Result<()> {
        let buf = lines(records);
        self.open_within(wait)?;
        let file = self.file.clone().expect("just opened");
        // The end is read, and the write made, with the file to this
        // process alone: during a handover the other process appends to
        // the same file, and a cut-back to an end known from earlier would
        // take its records (synced, their requests served) with it.
        let alone = match Exclusive::take_within(&file, &self.path, wait) {
            Ok(alone) => alone,
            // Busy, not broken: the file stays open.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
            Err(e) => {
                self.file = None;
                return Err(e);
            }
        };
        let end = file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        match (&*file).write_all(&buf) {
            Ok(()) => {
                self.size = end.unwrap_or(self.size) + buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // A write the disk filled part-way through is cut back: a
                // partial record would become a line that is no JSON (the
                // records are written again, whole).
                if let Some(end) = end {
                    if file.metadata().is_ok_and(|m| m.len() > end) {
                        let _ = file.set_len(end);
                    }
                }
                drop(alone);
                self.sync_before_leaving();
                self.file = None;
                Err(e)
            }
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        let result = match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        };
        if result.is_err() {
            self.file = None;
        }
        result
    }
}

/// An exclusive `flock` on an audit file, released when dropped: the old
/// and the new process of a handover append to the same file, and each
/// judges its end (a torn line to end, a failed write to cut back) with
/// the file to itself. Where locks are not supported nothing is waited
/// for. The other process holds it for one write; held longer (anyone who
/// may open the file can lock it), the write fails as the sink's would,
/// rather than hold a request, or every request, without bound.
struct Exclusive<'a>(&'a File);

/// How long a writer waits for another process's lock.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// The failure of a write that waited `wait` for another process's lock
/// on the file at `path`.
fn held_too_long(path: &Path, wait: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "{} has been locked (flock) by another process for over {} s; fhirwall appends \
             only while it holds the lock",
            path.display(),
            wait.as_secs_f32()
        ),
    )
}

impl<'a> Exclusive<'a> {
    /// Takes the lock, waiting at most `wait` for another process's (zero:
    /// one try, `WouldBlock` when the lock is another's).
    fn take_within(file: &'a File, path: &Path, wait: Duration) -> io::Result<Exclusive<'a>> {
        use rustix::fs::FlockOperation::NonBlockingLockExclusive;
        let start = Instant::now();
        loop {
            match rustix::fs::flock(file, NonBlockingLockExclusive) {
                Ok(()) => return Ok(Exclusive(file)),
                // Interrupted: asked again at once.
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::WOULDBLOCK) if wait.is_zero() => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("{} is locked by another process", path.display()),
                    ))
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {}
                // Not supported here (some network file systems).
                Err(_) => return Ok(Exclusive(file)),
            }
            if start.elapsed() >= wait {
                return Err(held_too_long(path, wait));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, rustix::fs::FlockOperation::Unlock);
    }
}

/// Fsyncs the directory holding `path`, so a file created or renamed in
/// it survives a power loss. File systems that cannot fsync a directory
/// (they say `EINVAL`) keep their entries by their own means; a directory
/// that may be written but not read (`EACCES` on open) cannot be fsynced.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = parent_dir(path);
    let cannot_tell =
        [rustix::io::Errno::INVAL, rustix::io::Errno::ACCESS].map(|e| Some(e.raw_os_error()));
    match File::open(dir).and_then(|d| d.sync_all()) {
        // A file system that cannot fsync a directory, or a directory
        // fhirwall may write in but not open: nothing more can be done.
        Err(e) if cannot_tell.contains(&e.raw_os_error()) => Ok(()),
        r => r.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("fsync of directory {} failed: {e}", dir.display()),
            )
        }),
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The records as one buffer of lines.
fn lines(records: &[&Pending]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(records.iter().map(|p| p.bytes.len() + 1).sum());
    for p in records {
        buf.extend_from_slice(&p.bytes);
        buf.push(b'\n');
    }
    buf
}

/// Locks a shared file; a panic elsewhere while it was held leaves nothing
/// half-done that matters (writes are whole lines or failures).
pub(super) fn lock(file: &Mutex<AppendFile>) -> MutexGuard<'_, AppendFile> {
    file.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fsyncs the shared file without holding its lock for the fsync, so
/// requests appending decision records are not held up by the disk.
fn sync_unlocked(file: &Mutex<AppendFile>) -> io::Result<()> {
    let fd = lock(file).file.clone();
    let result = fd.map_or(Ok(()), |f| f.sync_data());
    if result.is_err() {
        lock(file).file = None;
    }
    result
}

/// Fsyncs `fd` when it is a regular file (stdout sent to one: `> audit.jsonl`,
/// systemd's `StandardOutput=append:`); says whether it did. A pipe or a
/// terminal cannot be fsynced: its reader (the container runtime,
/// journald) keeps the records as durably as it does.
fn sync_if_file(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    let regular = is_regular_file(fd);
    if regular {
        rustix::fs::fdatasync(fd).map_err(io::Error::from)?;
    }
    Ok(regular)
}

fn is_regular_file(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
    })
}

fn sync_stdout() -> io::Result<()> {
    use std::os::fd::AsFd;
    sync_if_file(io::stdout().as_fd()).map(|_| ())
}

/// Appends records to the shared file, waiting up to [`LOCK_WAIT`] for
/// another process's lock on it without holding the file's mutex while
/// it waits: request threads appending their own records (`fsync:
/// interval`/`never`) take that mutex, and would wait behind it.
fn write_unlocked(file: &Mutex<AppendFile>, records: &[&Pending]) -> io::Result<()> {
    let start = Instant::now();
    loop {
        match lock(file).write_within(records, Duration::ZERO) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(held_too_long(&lock(file).path, LOCK_WAIT))
            }
            result => return result,
        }
    }
}

/// Where records go.
enum Sink {
    Stdout(io::Stdout),
    File {
        /// Shared with the request path, which appends decision records
        /// itself when they need no fsync of their own.
        file: Arc<Mutex<AppendFile>>,
        max_bytes: u64,
        max_age: Option<Duration>,
        keep: usize,
        /// How a rotation renames the file (a failing one in tests).
        rename: Rename,
    },
    Fhir(FhirSink),
}

type Rename = fn(&Path, &Path) -> io::Result<()>;

struct FhirSink {
    endpoint: String,
    client: reqwest::Client,
    batch_max: usize,
    bearer_token: Option<String>,
}

impl FhirSink {
    /// Sends records as `batch` Bundles of `PUT AuditEvent/{id}` entries
    /// (so a retried batch does not duplicate events), at most `batch_max`
    /// records and, unless one record is larger, [`MAX_POST_BYTES`] each.
    /// Every entry must succeed; but a record the endpoint refuses for
    /// itself ([`PostError::record_refused`], or a 4xx entry status) is
    /// reported (by index) rather than failing the sink, if the endpoint
    /// took other records in the same write: held, it would be sent first
    /// forever and block every record after it. An endpoint that takes
    /// none refuses every record (a profile it enforces, a body limit below
    /// any record, a wrong path): the sink fails.
    fn send(&self, rt: &Runtime, records: &[&Pending]) -> Result<Vec<usize>, Partial> {
        let mut done = 0;
        let mut took = 0;
        let mut refused = Vec::new();
        // What was taken so far, when the write fails here: records
        // refused while none was taken were not written either.
        let failed = |done, took, refused: Vec<usize>, error| match took {
            0 => Partial::from(error),
            _ => Partial {
                done,
                refused,
                error,
            },
        };
        for chunk in chunks(records, self.batch_max, MAX_POST_BYTES) {
            let own = match self.post(rt, bundle(chunk), chunk.len()) {
                Ok(()) => Ok(Vec::new()),
                // The endpoint judged each entry.
                Err(PostError::Entries(statuses)) => {
                    if statuses
                        .iter()
                        .all(|s| s.starts_with('2') || entry_refused(s))
                    {
                        let bad = statuses
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| !s.starts_with('2'));
                        Ok(bad.map(|(i, _)| i).collect())
                    } else {
                        Err(PostError::Entries(statuses).into())
                    }
                }
                // The Bundle as a whole: one record at a time tells which.
                Err(e) if e.record_refused() && chunk.len() > 1 => self.one_by_one(rt, chunk),
                Err(e) if e.record_refused() => Ok(vec![0]),
                Err(e) => Err(e.into()),
            };
            match own {
                Ok(own) => {
                    took += chunk.len() - own.len();
                    refused.extend(own.into_iter().map(|i| done + i));
                }
                Err(error) => return Err(failed(done, took, refused, error)),
            }
            done += chunk.len();
        }
        // Refused for themselves: once more with their references as
        // text. A repository that checks references (HAPI's JPA server
        // does by default) refuses an event naming a resource it does not
        // hold: one deleted by the request audited, an id that was never
        // there, a fhirUser on another server, all of which the gateway's
        // records name. Set aside, a decision record would refuse its
        // request and a request record be lost.
        if !refused.is_empty() {
            let again = self.without_references(rt, records, &refused);
            took += again.len();
            refused.retain(|i| !again.contains(i));
        }
        if took == 0 && !refused.is_empty() {
            let error = io::Error::other(format!(
                "endpoint refused each of the {} AuditEvents sent, and took none",
                refused.len()
            ));
            return Err(failed(done, took, refused, error));
        }
        Ok(refused)
    }

    /// Sends the `refused` of `records` again with their references
    /// turned into text ([`references_as_text`]), in one Bundle: the
    /// indexes the endpoint took this time.
    fn without_references(
        &self,
        rt: &Runtime,
        records: &[&Pending],
        refused: &[usize],
    ) -> Vec<usize> {
        let again: Vec<(usize, Pending)> = refused
            .iter()
            .filter_map(|&i| {
                references_as_text(&records[i].bytes).map(|bytes| {
                    let id = records[i].id.clone();
                    (
                        i,
                        Pending {
                            id,
                            bytes,
                            ack: None,
                        },
                    )
                })
            })
            .collect();
        if again.is_empty() {
            return Vec::new();
        }
        let sent: Vec<&Pending> = again.iter().map(|(_, p)| p).collect();
        // In Bundles of the usual size (a backlog's refused records may be
        // many: every record of a user whose fhirUser is on another server).
        let mut taken = Vec::new();
        let mut at = 0;
        for chunk in chunks(&sent, self.batch_max, MAX_POST_BYTES) {
            let indexes = &again[at..at + chunk.len()];
            at += chunk.len();
            match self.post(rt, bundle(chunk), chunk.len()) {
                Ok(()) => taken.extend(indexes.iter().map(|(i, _)| *i)),
                Err(PostError::Entries(statuses)) => taken.extend(
                    indexes
                        .iter()
                        .zip(&statuses)
                        .filter(|(_, s)| s.starts_with('2'))
                        .map(|((i, _), _)| *i),
                ),
                // Not taken this time either: set aside as before.
                Err(_) => {}
            }
        }
        taken
    }

    /// Sends `chunk`'s records one at a time: the indexes of those the
    /// endpoint refused for themselves.
    fn one_by_one(&self, rt: &Runtime, chunk: &[&Pending]) -> io::Result<Vec<usize>> {
        let mut refused = Vec::new();
        for (i, p) in chunk.iter().enumerate() {
            match self.post(rt, bundle(std::slice::from_ref(p)), 1) {
                Ok(()) => {}
                Err(e) if e.record_refused() => refused.push(i),
                Err(PostError::Entries(s)) if s.iter().all(|s| entry_refused(s)) => refused.push(i),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(refused)
    }

    /// Whether the endpoint is there and lets fhirwall in: an empty batch
    /// is sent; a server that refuses an empty Bundle as invalid (400,
    /// 422) still answered, so only network errors, 401/403/407, a path
    /// that takes no batch (404/405/410) and 5xx count as down (else a server strict about empty Bundles would keep
    /// the gateway unready forever).
    fn probe(&self, rt: &Runtime) -> io::Result<()> {
        let empty = br#"{"resourceType":"Bundle","type":"batch","entry":[]}"#.to_vec();
        let (status, _) = self.exchange(rt, empty)?;
        // 404/405/410: no FHIR base takes batches there (a wrong path); a
        // redirect is not followed, so records would not be taken either.
        let refused = status.is_server_error()
            || status.is_redirection()
            || matches!(status.as_u16(), 401 | 403 | 404 | 405 | 407 | 410);
        if refused {
            return Err(io::Error::other(format!("endpoint answered {status}")));
        }
        Ok(())
    }

    /// POSTs a Bundle: the status and body of the answer.
    fn exchange(
        &self,
        rt: &Runtime,
        body: Vec<u8>,
    ) -> io::Result<(reqwest::StatusCode, bytes::Bytes)> {
        let mut req = self
            .client
            .post(&self.endpoint)
            .header("content-type", "application/fhir+json")
            .header("accept", "application/fhir+json")
            .body(body);
        if let Some(t) = &self.bearer_token {
            req = req.bearer_auth(t);
        }
        rt.block_on(async move {
            let resp = req
                .send()
                .await
                .map_err(|e| io::Error::other(crate::call_error(e)))?;
            let status = resp.status();
            let answer = resp
                .bytes()
                .await
                .map_err(|e| io::Error::other(crate::call_error(e)))?;
            Ok((status, answer))
        })
    }

    /// POSTs a batch of `entries` AuditEvents; every entry must succeed.
    fn post(&self, rt: &Runtime, body: Vec<u8>, entries: usize) -> Result<(), PostError> {
        let (status, answer) = self.exchange(rt, body).map_err(PostError::Down)?;
        if !status.is_success() {
            return Err(PostError::Status(status));
        }
        let v: serde_json::Value = serde_json::from_slice(&answer).map_err(|e| {
            PostError::Down(io::Error::other(format!(
                "endpoint answer is not JSON: {e}"
            )))
        })?;
        let statuses: Vec<&str> = v["entry"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["response"]["status"].as_str().unwrap_or(""))
                    .collect()
            })
            .unwrap_or_default();
        if statuses.len() != entries {
            return Err(PostError::Down(io::Error::other(format!(
                "endpoint answered {} entries for {entries} AuditEvents",
                statuses.len()
            ))));
        }
        if statuses.iter().any(|s| !s.starts_with('2')) {
            let statuses = statuses.into_iter().map(str::to_string).collect();
            return Err(PostError::Entries(statuses));
        }
        Ok(())
    }
}

/// Bundles POSTed to an audit endpoint stay under this size unless one
/// record alone is larger: endpoints limit request bodies (nginx's
/// default is 1 MiB).
const MAX_POST_BYTES: usize = 1 << 20;

/// `records` in runs of at most `max` records and `max_bytes` (a record
/// larger than that goes alone).
fn chunks<'a, 'p>(
    records: &'a [&'p Pending],
    max: usize,
    max_bytes: usize,
) -> impl Iterator<Item = &'a [&'p Pending]> {
    let mut rest = records;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = ENTRY_WRAPPER;
        let mut n = 0;
        while n < rest.len() && n < max.max(1) {
            bytes += entry_size(rest[n]);
            if n > 0 && bytes > max_bytes {
                break;
            }
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// Bytes a Bundle adds around each record (besides its id), and once.
const ENTRY_WRAPPER: usize = 96;

/// Bytes `p` takes in a Bundle (at most).
fn entry_size(p: &Pending) -> usize {
    p.bytes.len() + ENTRY_WRAPPER + p.id.len()
}

/// A `batch` Bundle of `PUT AuditEvent/{id}` entries.
fn bundle(records: &[&Pending]) -> Vec<u8> {
    let size: usize = records.iter().map(|p| entry_size(p)).sum();
    let mut body = Vec::with_capacity(size + ENTRY_WRAPPER);
    body.extend_from_slice(br#"{"resourceType":"Bundle","type":"batch","entry":["#);
    for (i, p) in records.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(br#"{"resource":"#);
        body.extend_from_slice(&p.bytes);
        body.extend_from_slice(br#","request":{"method":"PUT","url":"AuditEvent/"#);
        body.extend_from_slice(p.id.as_bytes());
        body.extend_from_slice(br#""}}"#);
    }
    body.extend_from_slice(b"]}");
    body
}

/// An AuditEvent with the `reference` of each agent's `who` and each
/// entity's `what` moved to its `display` (what it names stays readable,
/// no longer a link a repository checks); `None` when it has none.
fn references_as_text(event: &[u8]) -> Option<Vec<u8>> {
    let mut ev: serde_json::Value = serde_json::from_slice(event).ok()?;
    let mut moved = false;
    for (list, key) in [("agent", "who"), ("entity", "what")] {
        let Some(items) = ev.get_mut(list).and_then(serde_json::Value::as_array_mut) else {
            continue;
        };
        for item in items {
            if let Some(r) = item.get_mut(key).and_then(serde_json::Value::as_object_mut) {
                if let Some(reference) = r.remove("reference") {
                    r.entry("display").or_insert(reference);
                    moved = true;
                }
            }
        }
    }
    moved.then(|| serde_json::to_vec(&ev).ok()).flatten()
}

/// An entry status (`"400 Bad Request"`) refusing that entry for itself:
/// a client error other than a timeout or a rate limit.
fn entry_refused(status: &str) -> bool {
    status.starts_with('4') && !status.starts_with("408") && !status.starts_with("429")
}

/// Why a POST to the audit endpoint did not take every record.
enum PostError {
    /// No answer, or not one that says anything of the records.
    Down(io::Error),
    /// The Bundle refused as a whole.
    Status(reqwest::StatusCode),
    /// Some entries refused (their statuses, in order).
    Entries(Vec<String>),
}

impl PostError {
    /// The records themselves may be what the endpoint refuses: 400, 413
    /// or 422 (not an authorisation, a path or the server failing).
    fn record_refused(&self) -> bool {
        matches!(self, PostError::Status(s) if matches!(s.as_u16(), 400 | 413 | 422))
    }
}

impl From<PostError> for io::Error {
    fn from(e: PostError) -> io::Error {
        match e {
            PostError::Down(e) => e,
            PostError::Status(s) => io::Error::other(format!("endpoint answered {s}")),
            PostError::Entries(statuses) => io::Error::other(format!(
                "endpoint did not accept every AuditEvent (entry statuses: {statuses:?})"
            )),
        }
    }
}

/// A write that failed part-way: the first `done` records were taken
/// (but those in `refused`, refused for themselves), the rest not.
struct Partial {
    done: usize,
    refused: Vec<usize>,
    error: io::Error,
}

/// A write that failed before any record was taken.
impl From<io::Error> for Partial {
    fn from(error: io::Error) -> Partial {
        Partial {
            done: 0,
            refused: Vec::new(),
            error,
        }
    }
}

impl Sink {
    fn describe(&self) -> String {
        match self {
            Sink::Stdout(_) => "stdout".into(),
            Sink::File { file, .. } => lock(file).path.display().to_string(),
            // Its query may hold a key (`?subscription-key=`): not logged.
            Sink::Fhir(f) => match f.endpoint.split_once('?') {
                Some((base, _)) => format!("{base}?…"),
                None => f.endpoint.clone(),
            },
        }
    }

    /// Writes records; with `sync`, makes them durable too. Says which
    /// records the sink refused for themselves (by index: the FHIR
    /// endpoint's judgement), and on failure how many records (a prefix)
    /// it took all the same.
    fn write(
        &mut self,
        rt: &Runtime,
        records: &[&Pending],
        sync: bool,
    ) -> Result<Vec<usize>, Partial> {
        let none = Partial::from;
        match self {
            Sink::Stdout(out) => {
                // One write for the batch: stdout is line-buffered, and a
                // record at a time would be a system call per record.
                let mut lock = out.lock();
                lock.write_all(&lines(records)).map_err(none)?;
                lock.flush().map_err(none)?;
                if sync {
                    sync_stdout().map_err(none)?;
                }
                Ok(Vec::new())
            }
            Sink::File { file, .. } => {
                write_unlocked(file, records).map_err(none)?;
                if sync {
                    sync_unlocked(file).map_err(none)?;
                    // Deleted since it was last looked at (a clean-up
                    // job): the records are durable in a file nobody can
                    // find. Written again, to a new file at its path,
                    // before their requests proceed.
                    if lock(file).unlinked() {
                        tracing::error!(path = %lock(file).path.display(), "audit file was deleted by someone else while records were written to it; they are written again to a new one at its path");
                        lock(file).start_anew().map_err(none)?;
                        write_unlocked(file, records).map_err(none)?;
                        sync_unlocked(file).map_err(none)?;
                    }
                }
                Ok(Vec::new())
            }
            Sink::Fhir(f) => f.send(rt, records),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        match self {
            Sink::File { file, .. } => sync_unlocked(file),
            Sink::Stdout(_) => sync_stdout(),
            Sink::Fhir(_) => Ok(()),
        }
    }

    /// Checks the sink can take records (at start and while it is down).
    fn probe(&mut self, rt: &Runtime) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.flush(),
            Sink::File { file, .. } => lock(file).probe(),
            Sink::Fhir(f) => f.probe(rt),
        }
    }

    /// Rotates the file when it is too big or too old: renames it to
    /// `<name>.<UTC time>`, starts a new one and prunes old ones.
    fn rotate_if_due(&mut self) -> io::Result<bool> {
        let Sink::File {
            file,
            max_bytes,
            max_age,
            keep,
            rename,
        } = self
        else {
            return Ok(false);
        };
        let mut file = lock(file);
        if file.moved_away() {
            tracing::error!(path = %file.path.display(), "audit file was moved or deleted by someone else (rotated outside fhirwall?); a new one is started at its path");
            // What requests appended to it since the last fsync, made
            // durable where it now is.
            file.sync_before_leaving();
            file.start_anew()?;
            return Ok(true);
        }
        if file.file.is_none() {
            file.open()?;
        }
        let too_big = *max_bytes > 0 && file.size >= *max_bytes;
        let too_old = max_age.is_some_and(|age| {
            file.size > 0
                && SystemTime::now()
                    .duration_since(file.opened)
                    .is_ok_and(|d| d >= age)
        });
        let paused = file.rotate_after.is_some_and(|t| Instant::now() < t);
        if !(too_big || too_old) || paused {
            return Ok(false);
        }
        file.sync()?;
        // During a handover the other process appends to this file and
        // may rotate it at the same moment: under the file's lock, it is
        // renamed only if still at its path (else the other rotated it,
        // and the new file at the path is the one to write to), and never
        // over an existing file.
        let Some(fd) = file.file.clone() else {
            return Ok(false);
        };
        let alone = match Exclusive::take_within(&fd, &file.path, Duration::ZERO) {
            Ok(alone) => alone,
            // The other process is appending: tried again at the next
            // batch, not waited for with the file's mutex held.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => {
                tracing::error!(error = %e, path = %file.path.display(), "audit file could not be rotated; records go on being appended to it");
                file.rotate_after = Some(Instant::now() + Duration::from_secs(60));
                return Ok(false);
            }
        };
        if file.moved_away() {
            drop(alone);
            tracing::info!(path = %file.path.display(), "audit file was rotated by another process (a handover); writing to the new one");
            file.start_anew()?;
            return Ok(true);
        }
        let rotated = rotated_name(&file.path);
        let renamed = rename(&file.path, &rotated);
        drop(alone);
        // A rotation that cannot be made (a directory fhirwall may not
        // write in) leaves the records going to the file they go to: the
        // sink is not down for it. Tried again in a minute.
        if let Err(e) = renamed {
            // Still the file at its path: records go on to it. Moved or
            // deleted by someone else meanwhile (the file was synced just
            // above): a new one is started there, as records in a file
            // nobody can find are lost.
            if file.moved_away() {
                tracing::error!(error = %e, path = %file.path.display(), "audit file was moved or deleted by someone else; a new one is started at its path");
                file.start_anew()?;
                return Ok(true);
            }
            tracing::error!(error = %e, path = %file.path.display(), "audit file could not be rotated; records go on being appended to it");
            file.rotate_after = Some(Instant::now() + Duration::from_secs(60));
            return Ok(false);
        }
        file.rotate_after = None;
        // Opening the new file fsyncs the directory: the rename with it.
        file.start_anew()?;
        prune(parent_dir(&file.path), &file.path, *keep);
        tracing::info!(rotated = %rotated.display(), "audit file rotated");
        Ok(true)
    }
}

/// Renames `from` to `to` unless `to` exists (which a plain rename would
/// replace, losing a rotated file another process made under that name
/// a moment before). Where that cannot be asked (`EINVAL`, `ENOSYS`,
/// `EOPNOTSUPP`) it renames plainly.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    use rustix::io::Errno;
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        // Not supported by the file system, the kernel or a seccomp
        // profile.
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => std::fs::rename(from, to),
        r => r.map_err(io::Error::from),
    }
}

/// `<path>.<YYYYMMDDTHHMMSSZ>`, with `-<n>` if that exists already.
fn rotated_name(path: &Path) -> PathBuf {
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    let base = format!("{}.{stamp}", path.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

/// Whether `name` is `<file>.<stamp>[-n]` as [`rotated_name`] makes them.
fn is_rotated(file: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(file).and_then(|r| r.strip_prefix('.')) else {
        return false;
    };
    let (stamp, n) = rest.split_once('-').unwrap_or((rest, "0"));
    let b = stamp.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
        && !n.is_empty()
        && n.bytes().all(|c| c.is_ascii_digit())
}

/// Deletes the oldest rotated files beyond `keep` (0 keeps all).
fn prune(dir: &Path, path: &Path, keep: usize) {
    if keep == 0 {
        return;
    }
    let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut rotated: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| is_rotated(file, n)))
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    rotated.sort();
    let excess = rotated.len().saturating_sub(keep);
    for (_, old) in rotated.into_iter().take(excess) {
        // Every deletion is said: audit records leave for good here.
        match std::fs::remove_file(&old) {
            Ok(()) => {
                tracing::warn!(path = %old.display(), keep, "rotated audit file deleted (audit.rotate_keep)")
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %old.display(), "rotated audit file could not be removed")
            }
        }
    }
}

/// The writer's state.
struct Writer {
    /// Runs the FHIR sink's calls.
    rt: Runtime,
    sink: Sink,
    shared: Arc<Shared>,
    fsync: Fsync,
    retry: Duration,
    /// Records the sink failed to take, oldest first (refuse mode).
    held: VecDeque<Pending>,
    /// The sink failed; it is tried again at this time.
    down_until: Option<Instant>,
    /// Written but not yet fsynced (`fsync: interval`).
    dirty_since: Option<Instant>,
    last_error_log: Option<Instant>,
}

/// Opens the sink and starts the writer thread.
pub(super) fn start(
    cfg: &Audit,
    shared: Arc<Shared>,
    file: Option<Arc<Mutex<AppendFile>>>,
) -> io::Result<()> {
    let mut sink = match &cfg.sink {
        AuditSink::Stdout => {
            use std::os::fd::AsFd;
            let out = io::stdout();
            if !is_regular_file(out.as_fd()) && cfg.fsync != Fsync::Never {
                tracing::warn!(
                    "audit records go to stdout, which is no file (a pipe or a terminal): no \
                     fsync can make them durable, so they are as safe from a power loss as its \
                     reader (the container runtime, journald) keeps them; use audit.sink: file \
                     for records on disk before the upstream sees the request"
                );
            }
            Sink::Stdout(out)
        }
        AuditSink::File(_) => Sink::File {
            file: file.expect("a file sink comes with its file"),
            max_bytes: cfg.rotate_max_bytes,
            max_age: cfg.rotate_max_age,
            keep: cfg.rotate_keep,
            rename: rename_no_replace,
        },
        AuditSink::Fhir {
            endpoint,
            timeout,
            batch_max,
            bearer_token,
        } => Sink::Fhir(FhirSink {
            endpoint: endpoint.to_string(),
            // Records go to the configured endpoint only: a redirect
            // (anywhere, plain http too) is a failed delivery.
            client: crate::trust::trusting(reqwest::Client::builder(), &[])
                .timeout(*timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(io::Error::other)?,
            batch_max: *batch_max,
            bearer_token: bearer_token
                .as_ref()
                .map(|t| String::from_utf8_lossy(&t.0).into_owned()),
        }),
    };
    let retry = cfg.retry;
    let fsync = cfg.fsync;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("fhirwall-audit".into())
        .spawn(move || {
            let up = sink.probe(&rt);
            let mut w = Writer {
                rt,
                sink,
                shared,
                fsync,
                retry,
                held: VecDeque::new(),
                down_until: None,
                dirty_since: None,
                last_error_log: None,
            };
            // A spill file on a full disk is no fallback.
            let spill = w
                .shared
                .spill
                .as_ref()
                .is_some_and(|f| lock(f).probe().is_ok());
            w.shared.spill_ok.store(spill, Ordering::Release);
            match up {
                Ok(()) => w.set_up(true),
                Err(e) => w.failed(&e),
            }
            w.run();
        })?;
    Ok(())
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Stopped (or panicked): nothing more can be recorded.
        self.shared.primary_up.store(false, Ordering::Release);
        self.shared.spill_ok.store(false, Ordering::Release);
        self.shared.metrics.sink_up.set(0);
        // Nobody is left to take what is queued: waiting requests are
        // refused (their acks drop), a flush returns. Request records (held
        // while the sink was down, or queued) go to the spill file if there
        // is one; what cannot is counted lost.
        let left = self.shared.queue.abandon();
        let mut orphans: Vec<Pending> = self.held.drain(..).collect();
        let mut lost = 0;
        for m in left {
            match m {
                Msg::Record(p) if p.ack.is_none() => orphans.push(p),
                Msg::Record(_) => lost += 1,
                Msg::Flush(_) => {}
            }
        }
        if !orphans.is_empty() {
            let spilled = self.shared.spill.as_ref().is_some_and(|spill| {
                let all: Vec<&Pending> = orphans.iter().collect();
                lock(spill).append(&all).is_ok()
            });
            if spilled {
                self.shared
                    .metrics
                    .written_spill
                    .inc_by(orphans.len() as u64);
            } else {
                lost += orphans.len();
            }
        }
        if lost > 0 {
            self.shared.metrics.dropped.inc_by(lost as u64);
            tracing::error!(
                lost,
                "the audit writer stopped with records queued; they are lost"
            );
        }
    }
}

impl Writer {
    fn run(&mut self) {
        let shared = self.shared.clone();
        let mut msgs: Vec<Msg> = Vec::new();
        let mut flushes = Vec::new();
        loop {
            let tick = self.next_wakeup();
            match shared.queue.take(&mut msgs, tick, LINGER) {
                Take::Batch => {}
                Take::Tick => {
                    // Retries, rotations and fsyncs can hang on a disk
                    // too: readiness sees it as it sees a batch's.
                    shared
                        .busy_since_ms
                        .store(super::epoch_ms(), Ordering::Release);
                    self.tick();
                    shared.busy_since_ms.store(0, Ordering::Release);
                    continue;
                }
                Take::Closed => break,
            }
            let mut batch = Vec::with_capacity(msgs.len());
            for m in msgs.drain(..) {
                match m {
                    Msg::Record(p) => batch.push(p),
                    Msg::Flush(ack) => flushes.push(ack),
                }
            }
            shared
                .busy_since_ms
                .store(super::epoch_ms(), Ordering::Release);
            self.write_batch(batch, !flushes.is_empty());
            shared.busy_since_ms.store(0, Ordering::Release);
            for ack in flushes.drain(..) {
                let _ = ack.send(());
            }
        }
        // Every handle is gone: write out what is held.
        self.write_batch(Vec::new(), true);
    }

    /// When the loop must wake without a message: to retry the sink or to
    /// fsync written records.
    fn next_wakeup(&mut self) -> Option<Duration> {
        self.absorb_dirty();
        let now = Instant::now();
        let retry = self.down_until.map(|t| t.saturating_duration_since(now));
        let sync = match (self.fsync, self.dirty_since) {
            // A failed sink is retried on its own schedule, not the fsync's.
            _ if self.down_until.is_some() => None,
            (Fsync::Interval(every), Some(since)) => {
                Some((since + every).saturating_duration_since(now))
            }
            // Requests may append at any time: look every interval.
            (Fsync::Interval(every), None) if self.shared.direct.is_some() => Some(every),
            _ => None,
        };
        // A file rotated by age is looked at even when no record comes.
        let age = match &self.sink {
            Sink::File {
                max_age: Some(age), ..
            } => Some((*age).min(Duration::from_secs(60))),
            _ => None,
        };
        [retry, sync, age].into_iter().flatten().min()
    }

    /// Nothing arrived in time: retry a failed sink, fsync what is dirty.
    fn tick(&mut self) {
        if self.down_until.is_some_and(|t| Instant::now() >= t) {
            self.write_batch(Vec::new(), false);
        }
        if self.down_until.is_none() {
            self.rotate();
        }
        self.absorb_dirty();
        if self.down_until.is_none() {
            if let Err(e) = self.sync_if_due() {
                self.failed(&e);
            }
        }
    }

    /// Requests appended decision records themselves: they are dirty.
    fn absorb_dirty(&mut self) {
        if self.shared.dirty.swap(false, Ordering::AcqRel) {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
    }

    /// With `fsync: interval`, fsyncs what was written once the interval
    /// since the first unsynced write is over.
    fn sync_if_due(&mut self) -> io::Result<()> {
        if let (Fsync::Interval(every), Some(since)) = (self.fsync, self.dirty_since) {
            if since.elapsed() >= every {
                self.sink.sync()?;
                self.dirty_since = None;
            }
        }
        Ok(())
    }

    /// Rotates the file if it is due, counting it; a failure marks the
    /// sink down.
    fn rotate(&mut self) {
        match self.sink.rotate_if_due() {
            Ok(true) => self.shared.metrics.rotations.inc(),
            Ok(false) => {}
            Err(e) => self.failed(&e),
        }
    }

    fn set_up(&mut self, up: bool) {
        if up && self.down_until.is_some() {
            tracing::info!(sink = %self.sink.describe(), "audit sink works again");
        }
        if up {
            self.down_until = None;
        }
        self.shared.metrics.sink_up.set(i64::from(up));
        self.shared.primary_up.store(up, Ordering::Release);
    }

    /// Counts and logs a sink failure and schedules the next attempt.
    fn failed(&mut self, e: &io::Error) {
        self.shared.metrics.failures_primary.inc();
        let was_up = self.down_until.is_none();
        self.down_until = Some(Instant::now() + self.retry);
        self.set_up(false);
        let quiet = self
            .last_error_log
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        if was_up || !quiet {
            self.last_error_log = Some(Instant::now());
            let mode = if self.shared.spill.is_some() {
                "records go to the spill file"
            } else {
                "new requests are refused"
            };
            tracing::error!(error = %e, sink = %self.sink.describe(), "audit sink failed; {mode} until it works again");
        }
    }

    /// Writes the held records and `batch`; acknowledges the waiters.
    /// `flushing`: a flush (shutdown) is waiting — try the sink even if it
    /// is not due, and account for every record.
    fn write_batch(&mut self, batch: Vec<Pending>, flushing: bool) {
        self.write_or_hold(batch, flushing);
        self.shared.held.store(self.held.len(), Ordering::Relaxed);
    }

    fn write_or_hold(&mut self, batch: Vec<Pending>, flushing: bool) {
        let due = flushing || self.down_until.is_none_or(|t| Instant::now() >= t);
        if due {
            self.rotate();
        }
        let due = flushing || self.down_until.is_none_or(|t| Instant::now() >= t);
        // A flush (shutdown) makes everything durable, whatever the policy.
        let sync = matches!(self.fsync, Fsync::Batch) || flushing;
        if due {
            let all: Vec<&Pending> = self.held.iter().chain(batch.iter()).collect();
            let none = Partial::from;
            let result = if all.is_empty() {
                if self.down_until.is_some() {
                    self.sink.probe(&self.rt).map(|()| Vec::new()).map_err(none)
                } else if flushing {
                    // Records requests appended themselves since the last
                    // fsync (`fsync: interval`).
                    self.shared.dirty.store(false, Ordering::Release);
                    let synced = self.sink.sync().map(|()| Vec::new()).map_err(none);
                    if synced.is_ok() {
                        self.dirty_since = None;
                    }
                    synced
                } else {
                    Ok(Vec::new())
                }
            } else {
                self.sink.write(&self.rt, &all, sync)
            };
            let all = all.len();
            // Records refused for themselves leave the batch (and the
            // held ones) first: they are answered, spilled or lost below.
            let mut batch = batch;
            let refused = match &result {
                Ok(r) | Err(Partial { refused: r, .. }) => self.take_refused(r, &mut batch),
            };
            let result = result.map_err(|p| (p.done - refused.len(), p.error));
            let all = all - refused.len();
            self.refused(refused);
            match result {
                Ok(_) => {
                    self.shared.metrics.written_primary.inc_by(all as u64);
                    if all > 0 && matches!(self.fsync, Fsync::Interval(_)) {
                        // Under steady traffic the timed wake-up never
                        // comes: fsync here once the interval is over.
                        self.dirty_since.get_or_insert_with(Instant::now);
                        if let Err(e) = self.sync_if_due() {
                            self.failed(&e);
                            self.fallback(batch, flushing);
                            return;
                        }
                    }
                    self.held.clear();
                    self.set_up(true);
                    ack_all(batch, true);
                    return;
                }
                Err((done, e)) => {
                    // What the sink took before it failed is written: only
                    // the rest is held, spilled or refused.
                    let from_held = done.min(self.held.len());
                    self.held.drain(..from_held);
                    let rest = batch.split_off(done - from_held);
                    self.shared.metrics.written_primary.inc_by(done as u64);
                    ack_all(batch, true);
                    self.failed(&e);
                    self.fallback(rest, flushing);
                    return;
                }
            }
        }
        self.fallback(batch, flushing);
    }

    /// Takes the records at indexes `refused` (ascending, over the held
    /// records then `batch`) out of both.
    fn take_refused(&mut self, refused: &[usize], batch: &mut Vec<Pending>) -> Vec<Pending> {
        let held = self.held.len();
        let mut out = Vec::with_capacity(refused.len());
        for &i in refused.iter().rev() {
            let p = if i < held {
                self.held.remove(i)
            } else {
                (i - held < batch.len()).then(|| batch.remove(i - held))
            };
            out.extend(p);
        }
        out.reverse();
        out
    }

    /// Records the sink refused for themselves (an audit endpoint that
    /// finds them too large or invalid): a decision record's request is
    /// refused; the others go to the spill file, if there is one, else are
    /// lost. Either way they are counted and logged by id, since sending
    /// them again would only be refused again, ahead of every record after
    /// them.
    fn refused(&mut self, refused: Vec<Pending>) {
        if refused.is_empty() {
            return;
        }
        self.shared.metrics.refused.inc_by(refused.len() as u64);
        let ids: Vec<String> = refused.iter().map(|p| p.id.clone()).collect();
        let mut kept = Vec::new();
        for p in refused {
            match p.ack {
                Some(ack) => {
                    let _ = ack.send(false);
                }
                None => kept.push(p),
            }
        }
        let kept: Vec<&Pending> = kept.iter().collect();
        let spilled = !kept.is_empty() && self.spill(&kept);
        let lost = if spilled { 0 } else { kept.len() };
        self.shared.metrics.dropped.inc_by(lost as u64);
        tracing::error!(
            ids = ?ids,
            spilled = kept.len() - lost,
            lost,
            sink = %self.sink.describe(),
            "the audit endpoint refused these records themselves (too large or invalid); not sent again"
        );
    }

    /// Appends `records` to the spill file, if there is one: whether they
    /// are there. Counted either way; a failure marks the spill file
    /// failing (new requests are refused), a success working again.
    fn spill(&self, records: &[&Pending]) -> bool {
        let Some(spill) = &self.shared.spill else {
            return false;
        };
        let mut file = lock(spill);
        // Nothing to write (the sink's retry with no records): an empty
        // append succeeds on a full disk, so ask for room instead.
        let result = if records.is_empty() {
            file.probe()
        } else {
            file.append(records)
        };
        match result {
            Ok(()) => {
                self.shared
                    .metrics
                    .written_spill
                    .inc_by(records.len() as u64);
                self.shared.spill_ok.store(true, Ordering::Release);
                true
            }
            Err(e) => {
                self.shared.metrics.failures_spill.inc();
                let was_ok = self.shared.spill_ok.swap(false, Ordering::AcqRel);
                // A probe failing again at each retry is logged once.
                if was_ok || !records.is_empty() {
                    tracing::error!(error = %e, path = %file.path.display(), "audit spill file could not be written; new requests are refused");
                }
                false
            }
        }
    }

    /// The sink did not take the records: spill them, or hold them (and
    /// refuse the waiting requests).
    fn fallback(&mut self, batch: Vec<Pending>, flushing: bool) {
        let all: Vec<&Pending> = self.held.iter().chain(batch.iter()).collect();
        if self.spill(&all) {
            self.held.clear();
            ack_all(batch, true);
            return;
        }
        for p in batch {
            match p.ack {
                // A decision record: its request is refused, and its request
                // record (written later) says so.
                Some(ack) => {
                    let _ = ack.send(false);
                }
                None => self.held.push_back(p),
            }
        }
        let limit = if flushing {
            0
        } else {
            self.shared.queue.capacity()
        };
        // Past the bound the newest go: while the sink is down new
        // requests are refused, so those are refusals' records; the oldest
        // are those of requests served before it failed.
        // Bytes bound the hold too (records of large Bundles).
        let max_bytes = super::queue::max_bytes(limit);
        let mut bytes = 0;
        let fits = self
            .held
            .iter()
            .take_while(|p| {
                bytes += p.bytes.len();
                bytes <= max_bytes
            })
            .count();
        let limit = limit.min(fits);
        if self.held.len() > limit {
            let excess = self.held.len() - limit;
            self.held.truncate(limit);
            self.shared.metrics.dropped.inc_by(excess as u64);
            tracing::error!(
                lost = excess,
                "audit records could not be written anywhere and were dropped"
            );
        }
    }
}

/// Tells the requests waiting for these records whether they were written.
fn ack_all(batch: Vec<Pending>, written: bool) {
    for p in batch {
        if let Some(ack) = p.ack {
            let _ = ack.send(written);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Stdout sent to a file is fsynced as a file sink is; a pipe cannot
    /// be, and is not tried.
    #[test]
    fn stdout_is_fsynced_when_it_is_a_file() {
        use std::os::fd::AsFd;
        let dir = std::env::temp_dir().join(format!("fhirwall-stdout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = File::create(dir.join("out.jsonl")).unwrap();
        assert!(sync_if_file(file.as_fd()).unwrap());
        let (reader, writer) = std::io::pipe().unwrap();
        assert!(!sync_if_file(writer.as_fd()).unwrap());
        assert!(!sync_if_file(reader.as_fd()).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Bundles for the audit endpoint hold at most `max` records and stay
    /// under the byte bound, but a record larger than it goes alone.
    #[test]
    fn records_are_sent_in_bounded_bundles() {
        let p = |n: usize| Pending {
            id: format!("{n}"),
            bytes: vec![b'x'; n],
            ack: None,
        };
        let records = [p(100), p(100), p(100), p(5000), p(100), p(100)];
        let all: Vec<&Pending> = records.iter().collect();
        let sizes = |max, bytes| {
            chunks(&all, max, bytes)
                .map(|c| c.iter().map(|p| p.bytes.len()).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            sizes(2, 1 << 20),
            [vec![100, 100], vec![100, 5000], vec![100, 100]]
        );
        assert_eq!(
            sizes(100, 1000),
            [vec![100, 100, 100], vec![5000], vec![100, 100]]
        );
        assert_eq!(sizes(0, 0).len(), 6, "one record at least per Bundle");
        let b: serde_json::Value = serde_json::from_slice(&bundle(&[&Pending {
            id: "a1".into(),
            bytes: br#"{"resourceType":"AuditEvent","id":"a1"}"#.to_vec(),
            ack: None,
        }]))
        .unwrap();
        assert_eq!(b["entry"][0]["request"]["url"], "AuditEvent/a1");
        assert_eq!(b["entry"][0]["resource"]["id"], "a1");
    }

    /// A file sink at `dir/audit.jsonl` holding a line, due for rotation
    /// (over 10 bytes), renaming by `rename`.
    fn due_for_rotation(dir: &Path, rename: Rename) -> (Sink, Arc<Mutex<AppendFile>>) {
        let path = dir.join("audit.jsonl");
        let mut f = AppendFile::new(path.clone());
        f.open()
            .unwrap()
            .write_all(b"{\"a\":\"record\"}\n")
            .unwrap();
        f.size = 15;
        let file = Arc::new(Mutex::new(f));
        let sink = Sink::File {
            file: file.clone(),
            max_bytes: 10,
            max_age: None,
            keep: 0,
            rename,
        };
        (sink, file)
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fhirwall-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A new audit file is its owner's and its group's only; another
    /// process holding the file's lock makes a write fail after a bounded
    /// wait (as the sink's would), rather than hang it; released, the
    /// file is written again.
    #[test]
    fn audit_files_are_private_and_a_held_lock_does_not_hang_a_write() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("lock-held");
        let path = dir.join("audit.jsonl");
        let mut f = AppendFile::new(path.clone());
        f.open().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "{mode:o}");
        assert_eq!(mode & 0o600, 0o600, "{mode:o}");
        let record = Pending {
            id: "r1".into(),
            bytes: b"{\"a\":1}".to_vec(),
            ack: None,
        };
        // Another open file description: flock conflicts as another
        // process's would.
        let other = File::open(&path).unwrap();
        rustix::fs::flock(&other, rustix::fs::FlockOperation::LockExclusive).unwrap();
        // A request thread tries once and leaves it to the writer thread,
        // the file kept open.
        let e = f.write_within(&[&record], Duration::ZERO).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        assert!(f.file.is_some());
        let start = Instant::now();
        let e = f.write(&[&record]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(start.elapsed() >= LOCK_WAIT, "{:?}", start.elapsed());
        assert!(start.elapsed() < LOCK_WAIT * 5, "{:?}", start.elapsed());
        rustix::fs::flock(&other, rustix::fs::FlockOperation::Unlock).unwrap();
        f.write(&[&record]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The writer waits for another process's lock without holding the
    /// file's mutex (request threads take it to append their own records),
    /// and writes once the lock is free.
    #[test]
    fn the_writer_waits_for_a_lock_without_the_files_mutex() {
        let dir = scratch("lock-wait");
        let path = dir.join("audit.jsonl");
        let file = Arc::new(Mutex::new(AppendFile::new(path.clone())));
        lock(&file).open().unwrap();
        let other = File::open(&path).unwrap();
        rustix::fs::flock(&other, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || {
                let record = Pending {
                    id: "w".into(),
                    bytes: b"{\"w\":1}".to_vec(),
                    ack: None,
                };
                write_unlocked(&file, &[&record])
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        // The mutex is free while the writer waits: taken at once, many
        // times over.
        for _ in 0..20 {
            let start = Instant::now();
            drop(lock(&file));
            assert!(start.elapsed() < LOCK_WAIT / 2, "{:?}", start.elapsed());
            std::thread::sleep(Duration::from_millis(5));
        }
        rustix::fs::flock(&other, rustix::fs::FlockOperation::Unlock).unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"w\":1}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A rotation never renames over a file (another process's rotated
    /// file of the same second), and one that waited for the file's lock
    /// while the other process of a handover holds the file's lock is put
    /// off (not waited for with the file's mutex held), and once the other
    /// has rotated it, writes to the new file instead of rotating that one
    /// away.
    #[test]
    fn rotations_by_two_processes_lose_no_file() {
        let dir = scratch("rotation-race");
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let e = rename_no_replace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "b");
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "a");

        let (mut sink, file) = due_for_rotation(&dir, rename_no_replace);
        let path = lock(&file).path.clone();
        // The other process holds the lock, rotates the file and starts a
        // new one, then lets go.
        let other = File::open(&path).unwrap();
        rustix::fs::flock(&other, rustix::fs::FlockOperation::LockExclusive).unwrap();
        assert!(!sink.rotate_if_due().unwrap(), "put off");
        let theirs = dir.join("audit.jsonl.theirs");
        std::fs::rename(&path, &theirs).unwrap();
        std::fs::write(&path, "").unwrap();
        rustix::fs::flock(&other, rustix::fs::FlockOperation::Unlock).unwrap();
        assert!(sink.rotate_if_due().unwrap());
        assert_eq!(
            std::fs::read_to_string(&theirs).unwrap(),
            "{\"a\":\"record\"}\n",
            "the other's rotated file is whole"
        );
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "audit.jsonl", "audit.jsonl.theirs", "b"]);
        // Ours now writes to the new file at the path.
        let record = Pending {
            id: "r".into(),
            bytes: b"{}".to_vec(),
            ack: None,
        };
        lock(&file).write(&[&record]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Records fsynced into a file deleted meanwhile are written again to
    /// a new file at its path before they count as written.
    #[test]
    fn records_written_to_a_deleted_file_are_written_again() {
        let dir = scratch("deleted");
        let (mut sink, file) = due_for_rotation(&dir, rename_no_replace);
        let path = lock(&file).path.clone();
        std::fs::remove_file(&path).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let record = Pending {
            id: "r".into(),
            bytes: b"{\"b\":2}".to_vec(),
            ack: None,
        };
        assert!(sink.write(&rt, &[&record], true).is_ok());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"b\":2}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A rename refused (a directory fhirwall may not write in) leaves the
    /// sink up, writing on to the same file, and is tried again only after
    /// a pause; then a rename that works rotates.
    #[test]
    fn a_rotation_that_cannot_be_made_goes_on_in_the_same_file_and_is_retried_later() {
        static TRIED: AtomicUsize = AtomicUsize::new(0);
        let dir = scratch("rotation-refused");
        let (mut sink, file) = due_for_rotation(&dir, |_, _| {
            TRIED.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        });
        let ident = lock(&file).ident;
        assert!(!sink.rotate_if_due().expect("not a sink failure"));
        assert_eq!(TRIED.load(Ordering::SeqCst), 1);
        assert_eq!(lock(&file).ident, ident, "the same file is kept");
        assert!(lock(&file).file.is_some());
        assert!(!sink.rotate_if_due().unwrap());
        assert_eq!(TRIED.load(Ordering::SeqCst), 1, "paused, not tried again");
        lock(&file).rotate_after = Some(Instant::now());
        let Sink::File { rename, .. } = &mut sink else {
            unreachable!()
        };
        *rename = |from, to| std::fs::rename(from, to);
        assert!(
            sink.rotate_if_due().unwrap(),
            "rotated once the pause ended"
        );
        assert_ne!(lock(&file).ident, ident, "a new file at the path");
        let rotated: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_rotated("audit.jsonl", n))
            .collect();
        assert_eq!(rotated.len(), 1, "{rotated:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A rename that fails because someone else moved the file meanwhile
    /// starts a new file at the path (records in a file nobody finds are
    /// lost).
    #[test]
    fn a_rotation_that_fails_because_the_file_was_moved_starts_a_new_one() {
        let dir = scratch("rotation-moved");
        let (mut sink, file) = due_for_rotation(&dir, |from, _| {
            std::fs::rename(from, from.with_extension("taken"))?;
            Err(io::Error::from(io::ErrorKind::NotFound))
        });
        let ident = lock(&file).ident;
        assert!(sink.rotate_if_due().unwrap());
        assert_ne!(lock(&file).ident, ident, "a new file at the path");
        assert!(dir.join("audit.jsonl").exists());
        assert!(lock(&file).rotate_after.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotated_names_are_recognised_and_nothing_else() {
        assert!(is_rotated("audit.jsonl", "audit.jsonl.20261125T181500Z"));
        assert!(is_rotated("audit.jsonl", "audit.jsonl.20261125T181500Z-3"));
        assert!(!is_rotated("audit.jsonl", "audit.jsonl"));
        assert!(!is_rotated("audit.jsonl", "audit.jsonl.spill"));
        assert!(!is_rotated("audit.jsonl", "audit.jsonl.20261125T181500Z-"));
        assert!(!is_rotated("audit.jsonl", "audit.jsonl.2026112XT181500Z"));
        assert!(!is_rotated("audit.jsonl", "other.jsonl.20261125T181500Z"));
    }
}
