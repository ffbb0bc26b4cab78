//! State files: versioned, checksummed, written atomically.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! offset  size  field
//! 0       8     magic  b"MBSTATE\0"
//! 8       4     format version (FORMAT_VERSION)
//! 12      4     reserved, 0
//! 16      8     payload length in bytes
//! 24      4     CRC-32 (IEEE) of the payload
//! 28      4     reserved, 0
//! 32      ...   payload
//! ```
//!
//! Payload: `u64` length of a JSON document (settings, core block, next id, and per bank its
//! entries — id, text, provenance, retired — plus the byte length of its serialised graph, if
//! any), the JSON itself, then per bank (episodic, semantic, procedural) its vectors as `f32`
//! rows in id order and its usearch graph bytes. Graphs are stored (not rebuilt) so a loaded state
//! searches exactly like the one that was saved.
//!
//! Saving writes a temporary file in the target's directory, fsyncs it, renames it over the
//! target and fsyncs the directory: a crash at any point leaves either the old file or the new
//! one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bank::Bank;
use crate::config::StateConfig;
use crate::kinds::BankKind;
use crate::records::Provenance;
use crate::retrieval::Graph;
use crate::snapshot::Snapshot;
use crate::state::MemoryState;

pub use crate::error::{PersistError, Problem};

pub const MAGIC: &[u8; 8] = b"MBSTATE\0";
/// Bump on any change to the layout or the JSON schema.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;

#[cold]
fn err(path: &Path, problem: Problem, message: impl Into<String>) -> PersistError {
    PersistError {
        path: path.to_path_buf(),
        problem,
        message: message.into(),
    }
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    id: u64,
    text: String,
    provenance: Provenance,
    retired: bool,
}

#[derive(Serialize, Deserialize)]
struct FileBank {
    kind: BankKind,
    entries: Vec<FileEntry>,
    graph_covered: usize,
    graph_bytes: usize,
}

#[derive(Serialize, Deserialize)]
struct FileMeta {
    config: StateConfig,
    core: String,
    next_id: u64,
    banks: Vec<FileBank>,
}

/// Serialise a state's body into a payload (see the module docs).
fn encode(snap: &Snapshot) -> Result<Vec<u8>, String> {
    let mut graphs = Vec::new();
    let mut banks = Vec::new();
    for b in snap.banks.iter() {
        let (covered, bytes) = match &b.graph {
            Some(g) => (g.covered, g.serialized()?),
            None => (0, Vec::new()),
        };
        banks.push(FileBank {
            kind: b.kind,
            entries: b
                .rows
                .iter()
                .enumerate()
                .map(|(r, row)| FileEntry {
                    id: row.id,
                    text: row.text.clone(),
                    provenance: (*row.provenance).clone(),
                    retired: !b.live[r],
                })
                .collect(),
            graph_covered: covered,
            graph_bytes: bytes.len(),
        });
        graphs.push(bytes);
    }
    let meta = FileMeta {
        config: snap.config.clone(),
        core: snap.core.clone(),
        next_id: snap.next_id,
        banks,
    };
    let json = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
    let vec_bytes: usize = snap.banks.iter().map(|b| b.vectors.len() * 4).sum();
    let graph_bytes: usize = graphs.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(8 + json.len() + vec_bytes + graph_bytes);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (b, g) in snap.banks.iter().zip(&graphs) {
        for x in &b.vectors {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.extend_from_slice(g);
    }
    Ok(out)
}

fn decode(payload: &[u8]) -> Result<Snapshot, String> {
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], String> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= payload.len())
            .ok_or("payload ends early")?;
        let s = &payload[*pos..end];
        *pos = end;
        Ok(s)
    };
    let mut pos = 0usize;
    let json_len = u64::from_le_bytes(take(&mut pos, 8)?.try_into().unwrap()) as usize;
    let meta: FileMeta =
        serde_json::from_slice(take(&mut pos, json_len)?).map_err(|e| e.to_string())?;
    meta.config.validate().map_err(|e| e.to_string())?;
    check_core_limit(&meta.core, &meta.config)?;
    if meta.banks.len() != 3 {
        return Err(format!("expected 3 banks, found {}", meta.banks.len()));
    }
    let dim = meta.config.dim;
    let mut snap = Snapshot::new(meta.config.clone());
    snap.core = meta.core;
    snap.next_id = meta.next_id;
    let mut last_id: Option<u64> = None;
    let mut all_ids = Vec::new();
    for (i, fb) in meta.banks.into_iter().enumerate() {
        if fb.kind != BankKind::ALL[i] {
            return Err(format!(
                "bank {i} is {:?}, expected {:?}",
                fb.kind,
                BankKind::ALL[i]
            ));
        }
        let n = fb.entries.len();
        let raw = take(&mut pos, n.checked_mul(dim * 4).ok_or("too many entries")?)?;
        let mut bank = Bank::new(fb.kind, dim);
        last_id = None;
        for (r, e) in fb.entries.into_iter().enumerate() {
            if last_id.is_some_and(|l| l >= e.id) || e.id >= snap.next_id {
                return Err(format!(
                    "entry ids out of order or past next_id in bank {i}"
                ));
            }
            last_id = Some(e.id);
            all_ids.push(e.id);
            let v: Vec<f32> = raw[r * dim * 4..(r + 1) * dim * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(format!("non-finite vector for entry {}", e.id));
            }
            bank.push(e.id, e.text, Arc::new(e.provenance), &v, !e.retired);
        }
        let graph = take(&mut pos, fb.graph_bytes)?;
        if fb.graph_bytes > 0 {
            if fb.graph_covered > bank.len() {
                return Err("graph covers more rows than the bank has".into());
            }
            bank.graph = Some(Arc::new(Graph::restore(graph, fb.graph_covered)?));
        }
        snap.banks[i] = bank;
    }
    let _ = last_id;
    all_ids.sort_unstable();
    if all_ids.windows(2).any(|w| w[0] == w[1]) {
        return Err("an id appears in two banks".into());
    }
    if pos != payload.len() {
        return Err(format!(
            "{} unexpected bytes after the data",
            payload.len() - pos
        ));
    }
    Ok(snap)
}

fn io_problem(e: &std::io::Error) -> Problem {
    if e.kind() == std::io::ErrorKind::NotFound {
        Problem::NotFound
    } else {
        Problem::Io
    }
}

/// The core block must fit its limit: every builder condenses (or, failing that, truncates) it
/// before a state is saved, so a longer block in a file was not written by a builder, and it
/// would flood every prompt built from the state. Refused both ways, so that what `save`
/// writes always loads.
fn check_core_limit(core: &str, config: &StateConfig) -> Result<(), String> {
    let chars = core.chars().count();
    if chars > config.core_limit {
        return Err(format!(
            "the core block has {chars} characters, over the state's limit of {}",
            config.core_limit
        ));
    }
    Ok(())
}

/// Write `snap` to `path` atomically (see the module docs).
pub fn save_snapshot(snap: &Snapshot, path: &Path) -> Result<(), PersistError> {
    check_core_limit(&snap.core, &snap.config).map_err(|m| {
        err(
            path,
            Problem::Malformed,
            format!("not saved: {m}; condense it first"),
        )
    })?;
    let payload = encode(snap).map_err(|m| {
        err(
            path,
            Problem::Io,
            format!("could not serialise the state: {m}"),
        )
    })?;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    write_atomic(path, &[&header, &payload])
}

/// Write `parts` to `path` via a temporary file in the same directory + fsync + rename.
pub fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<(), PersistError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| err(path, Problem::Io, "the path names no file"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // Make the rename itself durable. Not every platform can fsync a directory; the file
        // is complete either way, so a failure here is not an error.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err(
            path,
            io_problem(&e),
            format!("could not write the state file: {e}"),
        ));
    }
    Ok(())
}

/// Read and check a state file.
pub fn load_snapshot(path: &Path) -> Result<Snapshot, PersistError> {
    let mut f = File::open(path).map_err(|e| {
        let p = io_problem(&e);
        let what = if p == Problem::NotFound {
            "no such state file".to_string()
        } else {
            e.to_string()
        };
        err(path, p, what)
    })?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .map_err(|e| err(path, Problem::Io, e.to_string()))?;
    let n = bytes.len();
    let magic_len = n.min(8);
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(err(
            path,
            Problem::BadMagic,
            "not a membuilder state file (wrong magic bytes)",
        ));
    }
    if n < HEADER_LEN {
        return Err(err(
            path,
            Problem::Truncated,
            format!("file is {n} bytes, shorter than the {HEADER_LEN}-byte header"),
        ));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(err(
            path,
            Problem::VersionMismatch,
            format!(
                "state file format version {version}, this build reads version {FORMAT_VERSION}"
            ),
        ));
    }
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let have = (n - HEADER_LEN) as u64;
    if have < len {
        return Err(err(
            path,
            Problem::Truncated,
            format!("payload is {have} bytes, the header says {len}"),
        ));
    }
    if have > len {
        return Err(err(
            path,
            Problem::Malformed,
            format!("{} bytes after the end of the payload", have - len),
        ));
    }
    let payload = &bytes[HEADER_LEN..];
    let want = u32_at(24);
    let got = crc32fast::hash(payload);
    if got != want {
        return Err(err(
            path,
            Problem::ChecksumMismatch,
            format!(
                "checksum mismatch (stored {want:08x}, computed {got:08x}): the file is corrupt"
            ),
        ));
    }
    decode(payload).map_err(|m| {
        err(
            path,
            Problem::Malformed,
            format!("malformed state data: {m}"),
        )
    })
}

impl MemoryState {
    /// Write atomically; see [`save_snapshot`].
    pub fn save(&self, path: &Path) -> Result<(), PersistError> {
        save_snapshot(self.snapshot(), path)
    }

    /// Read a state written by [`MemoryState::save`].
    pub fn load(path: &Path) -> Result<MemoryState, PersistError> {
        let snap = load_snapshot(path)?;
        Ok(MemoryState::from_snapshot(snap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mb-persist-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn sample(n: usize, limit: usize) -> MemoryState {
        let mut cfg = StateConfig::new(8);
        cfg.exact_search_limit = limit;
        let mut st = MemoryState::new(cfg).unwrap();
        let texts: Vec<String> = (0..n).map(|i| format!("memory {i}")).collect();
        let vecs: Vec<f32> = (0..n * 8)
            .map(|i| ((i * 7919) % 13) as f32 - 6.0 + 0.5)
            .collect();
        let provs = vec![
            Provenance {
                conversation: "c".into(),
                session: 1,
                ..Default::default()
            };
            n
        ];
        st.add_entries(BankKind::Semantic, &texts, &vecs, &provs)
            .unwrap();
        st.set_core("core text".into());
        st
    }

    #[test]
    fn round_trip_searches_identically_with_graph() {
        let d = tmpdir("rt");
        let st = sample(300, 100);
        assert!(st.snapshot().banks[1].graph.is_some());
        let p = d.join("s.mbstate");
        st.save(&p).unwrap();
        let back = MemoryState::load(&p).unwrap();
        assert_eq!(back.core(), "core text");
        let q: Vec<f32> = (0..8 * 5).map(|i| (i as f32).sin()).collect();
        assert_eq!(
            st.search(&q, 7, None).unwrap(),
            back.search(&q, 7, None).unwrap()
        );
        assert_eq!(
            st.layers().entries(None, true),
            back.layers().entries(None, true)
        );
    }

    #[test]
    fn core_over_its_limit_is_refused_both_ways() {
        let d = tmpdir("core");
        let p = d.join("s.mbstate");
        let mut st = sample(3, 100);
        st.set_core("x".repeat(5001));
        assert_eq!(st.save(&p).unwrap_err().problem, Problem::Malformed);
        assert!(!p.exists());
        // A forged file: valid layout and checksum, core block past the limit.
        let mut snap = sample(3, 100).snapshot().clone();
        snap.core = "x".repeat(100_000);
        let payload = encode(&snap).unwrap();
        let mut file = Vec::new();
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        file.extend_from_slice(&0u32.to_le_bytes());
        file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        file.extend_from_slice(&0u32.to_le_bytes());
        file.extend_from_slice(&payload);
        fs::write(&p, &file).unwrap();
        let e = MemoryState::load(&p).unwrap_err();
        assert_eq!(e.problem, Problem::Malformed);
        assert!(e.to_string().contains("100000 characters"), "{e}");
    }

    #[test]
    fn errors_name_the_problem() {
        let d = tmpdir("err");
        let p = d.join("s.mbstate");
        assert_eq!(
            MemoryState::load(&p).unwrap_err().problem,
            Problem::NotFound
        );
        sample(5, 100).save(&p).unwrap();
        let good = fs::read(&p).unwrap();
        fs::write(&p, &good[..good.len() - 3]).unwrap();
        assert_eq!(
            MemoryState::load(&p).unwrap_err().problem,
            Problem::Truncated
        );
        let mut bad = good.clone();
        bad[40] ^= 0x55;
        fs::write(&p, &bad).unwrap();
        assert_eq!(
            MemoryState::load(&p).unwrap_err().problem,
            Problem::ChecksumMismatch
        );
        let mut bad = good.clone();
        bad[8] = 99;
        fs::write(&p, &bad).unwrap();
        assert_eq!(
            MemoryState::load(&p).unwrap_err().problem,
            Problem::VersionMismatch
        );
        fs::write(&p, b"hello world, this is not a state file at all").unwrap();
        let e = MemoryState::load(&p).unwrap_err();
        assert_eq!(e.problem, Problem::BadMagic);
        assert!(e.to_string().contains("s.mbstate"));
    }
}
