//! A SessionManager with chunked storage, on the real model and real directories: sessions are stored as
//! manifests naming shared chunks (what they share is on disk once), restore byte for byte, survive a missing,
//! damaged or planted chunk by decoding that part again, keep the chunks they name through any eviction, and
//! export to one file that any context loads.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{greedy, model, temp_dir};
use llama_sessions::chunks::store::chunk_path;
use llama_sessions::chunks::{ChunkKey, PrefixCache};
use llama_sessions::{
    inspect_session, Context, ContextParams, DirectoryStore, Error, Metadata, NeverInterrupt,
    SessionKey, SessionManager,
};

const C: usize = 32;

fn params() -> ContextParams {
    ContextParams {
        n_ctx: 1024,
        n_batch: 64,
        n_threads: 2,
        ..ContextParams::default()
    }
}

/// A system prompt of several chunks.
fn system_prompt() -> String {
    (0..12)
        .map(|i| format!("Rule {i}: the lighthouse keeper logs ship number {i} at dusk. "))
        .collect()
}

fn chunk_cache(dir: &Path, max_bytes: u64) -> PrefixCache {
    PrefixCache::on_disk(dir.join("chunks"), max_bytes, C, "").unwrap()
}

fn chunked_manager(dir: &Path, max_bytes: u64) -> SessionManager {
    let store = Arc::new(DirectoryStore::open(dir).unwrap());
    SessionManager::new(model(), params(), store, 8)
        .unwrap()
        .with_chunked_storage(chunk_cache(dir, max_bytes))
        .unwrap()
}

fn file_manager(dir: &Path) -> SessionManager {
    let store = Arc::new(DirectoryStore::open(dir).unwrap());
    SessionManager::new(model(), params(), store, 8).unwrap()
}

fn chat(m: &SessionManager, id: &str, message: &str) -> Vec<i32> {
    let answer: Vec<i32> = m
        .chat(id, message, greedy(10), &mut NeverInterrupt)
        .unwrap()
        .tokens
        .iter()
        .map(|t| t.0)
        .collect();
    assert!(!answer.is_empty());
    answer
}

fn state_of(m: &SessionManager, id: &str) -> (Vec<i32>, Vec<u8>) {
    let session = m.load(id).unwrap();
    let context = session.context().lock().unwrap();
    (
        context.tokens(0).unwrap().iter().map(|t| t.0).collect(),
        context.sequence_state(0).unwrap(),
    )
}

fn manifest_keys(dir: &Path, id: &str) -> Vec<ChunkKey> {
    let info = inspect_session(&dir.join(format!("{id}.session")), None).unwrap();
    info.header
        .chunks
        .expect("a manifest")
        .chunks
        .iter()
        .map(|c| ChunkKey::from_hex(&c.key).unwrap())
        .collect()
}

fn files_bytes(dir: &Path, suffix: &str) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .map(|p| p.metadata().unwrap().len())
        .sum()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fn chunk_file(dir: &Path, key: &ChunkKey) -> PathBuf {
    chunk_path(&dir.join("chunks"), key)
}

/// Three sessions from one system prompt, one turn each.
fn three_sessions(m: &SessionManager) {
    let long_question = "Name a fruit that grows in the north, one that grows in the south, one that grows \
                         by the sea and one that grows in the mountains, and say which of them keeps best.";
    for (id, question) in [
        ("a", "Name a color."),
        ("b", "Name a city."),
        ("c", long_question),
    ] {
        m.create_session(id, Some(&system_prompt()), Metadata::new())
            .unwrap();
        chat(m, id, question);
    }
}

#[test]
fn sessions_name_shared_chunks_once_and_restore_byte_for_byte() {
    let dir = temp_dir("chunked-shared");
    let m = chunked_manager(&dir, 1 << 30);
    three_sessions(&m);
    let live: Vec<_> = ["a", "b", "c"].iter().map(|id| state_of(&m, id)).collect();
    // Every full chunk of every session is named; the system prompt's are the same keys in all three.
    let keys: Vec<Vec<ChunkKey>> = ["a", "b", "c"]
        .iter()
        .map(|id| manifest_keys(&dir, id))
        .collect();
    for (k, (tokens, _)) in keys.iter().zip(&live) {
        assert_eq!(k.len(), tokens.len() / C);
    }
    let system_tokens = model()
        .tokenize_chat(
            &[llama_sessions::ChatMessage {
                role: "system".into(),
                content: system_prompt(),
            }],
            false,
            true,
        )
        .unwrap()
        .len();
    let shared = system_tokens / C;
    assert!(shared >= 4, "the system prompt spans {shared} chunks");
    assert_eq!(keys[0][..shared], keys[1][..shared]);
    assert_eq!(keys[0][..shared], keys[2][..shared]);
    // Chunks on disk: the shared ones once, plus each session's own.
    let mut distinct: Vec<ChunkKey> = keys.iter().flatten().copied().collect();
    distinct.sort();
    distinct.dedup();
    let chunk_files = std::fs::read_dir(dir.join("chunks")).unwrap().count();
    assert_eq!(chunk_files, distinct.len());
    assert!(distinct.len() < keys.iter().map(Vec::len).sum::<usize>());

    // A restarted manager restores each session byte for byte, and continues as the live one does (on a
    // copy of the directory, so that the two do not write over each other).
    let copy = temp_dir("chunked-shared-copy");
    copy_dir(&dir, &copy);
    let restarted = chunked_manager(&copy, 1 << 30);
    for (id, (tokens, state)) in ["a", "b", "c"].iter().zip(&live) {
        let (tokens_after, state_after) = state_of(&restarted, id);
        assert_eq!(&tokens_after, tokens);
        assert!(
            state_after == *state,
            "session {id}'s KV state differs after a reload"
        );
    }
    assert_eq!(restarted.stats().recomputed_tokens, 0);
    assert_eq!(restarted.stats().prefill_tokens, 0);
    assert_eq!(
        chat(&restarted, "b", "And a river?"),
        chat(&m, "b", "And a river?")
    );
}

#[test]
fn chunked_storage_takes_a_fraction_of_the_bytes_of_one_file_per_session() {
    let dir = temp_dir("chunked-bytes");
    let chunked = chunked_manager(&dir.join("chunked"), 1 << 30);
    let files = file_manager(&dir.join("files"));
    three_sessions(&chunked);
    three_sessions(&files);
    let chunked_bytes = files_bytes(&dir.join("chunked"), ".session")
        + files_bytes(&dir.join("chunked/chunks"), ".kvchunk");
    let file_bytes = files_bytes(&dir.join("files"), ".session");
    // Three sessions of which most tokens are the shared system prompt: well under two thirds.
    assert!(
        chunked_bytes * 3 < file_bytes * 2,
        "chunked {chunked_bytes} bytes vs files {file_bytes}"
    );
}

#[test]
fn a_missing_damaged_or_planted_chunk_is_decoded_again_never_trusted() {
    let dir = temp_dir("chunked-damage");
    let secret = SessionKey::new(b"0123456789abcdef0123456789abcdef").unwrap();
    let store = Arc::new(DirectoryStore::open(&dir).unwrap());
    let m = SessionManager::new(model(), params(), store, 8)
        .unwrap()
        .with_secret_key(secret.clone())
        .with_chunked_storage(chunk_cache(&dir, 1 << 30))
        .unwrap();
    m.create_session("a", Some(&system_prompt()), Metadata::new())
        .unwrap();
    chat(&m, "a", "Name a color.");
    let (tokens, _) = state_of(&m, "a");
    let keys = manifest_keys(&dir, "a");
    let reload = || {
        let store = Arc::new(DirectoryStore::open(&dir).unwrap());
        let fresh = SessionManager::new(model(), params(), store, 8)
            .unwrap()
            .with_secret_key(secret.clone())
            .with_chunked_storage(chunk_cache(&dir, 1 << 30))
            .unwrap();
        let (tokens_after, _) = state_of(&fresh, "a");
        assert_eq!(tokens_after, tokens);
        fresh.stats().recomputed_tokens as usize
    };
    assert_eq!(reload(), 0);

    // Missing: chunk 2 and everything after it are decoded again (and offered to the cache again).
    std::fs::remove_file(chunk_file(&dir, &keys[2])).unwrap();
    assert_eq!(reload(), tokens.len() - 2 * C);
    assert!(chunk_file(&dir, &keys[2]).exists());

    // Damaged: a flipped byte fails the chunk's checksum; the chunk is removed and decoded again.
    let path = chunk_file(&dir, &keys[1]);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(reload(), tokens.len() - C);

    // Planted: a self-consistent chunk under the right key (its checksum recomputed) but other rows is not
    // the one the signed manifest names by digest.
    let path = chunk_file(&dir, &keys[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let body = bytes.len() - 32;
    bytes[body - 8] ^= 0x01;
    let checksum = *blake3::hash(&bytes[..body]).as_bytes();
    bytes[body..].copy_from_slice(&checksum);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(reload(), tokens.len());
}

#[test]
fn eviction_never_removes_a_chunk_a_stored_session_names() {
    let dir = temp_dir("chunked-evict");
    // A bound of one byte: every chunk no manifest names goes at once.
    let m = chunked_manager(&dir, 1);
    three_sessions(&m);
    let named: Vec<ChunkKey> = ["a", "b", "c"]
        .iter()
        .flat_map(|id| manifest_keys(&dir, id))
        .collect();
    for key in &named {
        assert!(chunk_file(&dir, key).exists());
    }
    let cache = m.prefix_cache().unwrap();
    let report = cache.gc().unwrap();
    assert_eq!(report.removed_corrupt, 0);
    for key in &named {
        assert!(chunk_file(&dir, key).exists(), "gc removed a named chunk");
    }
    // A new manager over the same directory learns the pins from the manifests before it evicts anything.
    drop(m);
    let reopened = chunked_manager(&dir, 1);
    reopened.prefix_cache().unwrap().gc().unwrap();
    for key in &named {
        assert!(
            chunk_file(&dir, key).exists(),
            "a reopened cache evicted a named chunk"
        );
    }
    // Once no session names them, a session's own chunks may go.
    let own: Vec<ChunkKey> = manifest_keys(&dir, "c")
        .into_iter()
        .filter(|k| !manifest_keys(&dir, "a").contains(k) && !manifest_keys(&dir, "b").contains(k))
        .collect();
    assert!(!own.is_empty());
    reopened.delete("c").unwrap();
    reopened.prefix_cache().unwrap().gc().unwrap();
    for key in &own {
        assert!(!chunk_file(&dir, key).exists());
    }
    assert_eq!(
        state_of(&reopened, "a").0.len() / C,
        manifest_keys(&dir, "a").len()
    );
    assert_eq!(reopened.stats().recomputed_tokens, 0);
}

#[test]
fn export_writes_one_file_that_any_context_loads() {
    let dir = temp_dir("chunked-export");
    let m = chunked_manager(&dir, 1 << 30);
    three_sessions(&m);
    let (tokens, state) = state_of(&m, "b");
    let exported = dir.join("b-export.session");
    let info = m.export("b", &exported).unwrap();
    assert_eq!(info.token_count(), tokens.len());
    assert!(inspect_session(&exported, None)
        .unwrap()
        .header
        .chunks
        .is_none());

    let mut plain = Context::new(model(), params()).unwrap();
    plain.load_session(&exported, None, None).unwrap();
    assert_eq!(
        plain
            .tokens(0)
            .unwrap()
            .iter()
            .map(|t| t.0)
            .collect::<Vec<_>>(),
        tokens
    );
    assert!(plain.sequence_state(0).unwrap() == state);

    // The manifest itself needs the chunk store: a plain context says so and stays as it was.
    let err = plain
        .load_session(&dir.join("b.session"), None, None)
        .unwrap_err();
    assert!(matches!(err, Error::SessionVersion { .. }), "{err}");
    assert!(err.to_string().contains("llama-sessions export"), "{err}");
    assert_eq!(plain.token_count(0).unwrap(), tokens.len());
    // A context using the same chunk cache reads it.
    let mut with_cache =
        Context::with_prefix_cache(model(), params(), chunk_cache(&dir, 1 << 30)).unwrap();
    with_cache
        .load_session(&dir.join("b.session"), None, None)
        .unwrap();
    assert!(with_cache.sequence_state(0).unwrap() == state);
}

#[test]
fn sessions_stored_as_files_load_and_are_rewritten_as_manifests() {
    let dir = temp_dir("chunked-upgrade");
    let files = file_manager(&dir);
    files
        .create_session("old", Some(&system_prompt()), Metadata::new())
        .unwrap();
    let answer = chat(&files, "old", "Name a color.");
    let (tokens, state) = state_of(&files, "old");
    drop(files);
    assert!(inspect_session(&dir.join("old.session"), None)
        .unwrap()
        .header
        .chunks
        .is_none());

    let m = chunked_manager(&dir, 1 << 30);
    assert!(state_of(&m, "old") == (tokens.clone(), state.clone()));
    let next = chat(&m, "old", "Name a city.");
    assert_eq!(
        manifest_keys(&dir, "old").len(),
        state_of(&m, "old").0.len() / C
    );
    // The same conversation in a manager that stayed with files answers alike.
    let other = file_manager(&dir.join("again"));
    other
        .create_session("old", Some(&system_prompt()), Metadata::new())
        .unwrap();
    assert_eq!(chat(&other, "old", "Name a color."), answer);
    assert_eq!(chat(&other, "old", "Name a city."), next);
}

#[test]
fn an_in_memory_cache_cannot_hold_sessions() {
    let dir = temp_dir("chunked-memory");
    let store = Arc::new(DirectoryStore::open(&dir).unwrap());
    let err = SessionManager::new(model(), params(), store, 8)
        .unwrap()
        .with_chunked_storage(PrefixCache::in_memory(1 << 20, C, "").unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
    assert!(err.to_string().contains("in memory"), "{err}");
}

#[test]
fn a_chunk_file_of_any_size_is_read_no_further_than_a_chunk() {
    let dir = temp_dir("chunked-huge");
    let m = chunked_manager(&dir, 1 << 30);
    m.create_session("a", Some(&system_prompt()), Metadata::new())
        .unwrap();
    chat(&m, "a", "Name a color.");
    let (tokens, state) = state_of(&m, "a");
    drop(m);
    let keys = manifest_keys(&dir, "a");
    let path = chunk_file(&dir, &keys[0]);
    let sound_len = std::fs::metadata(&path).unwrap().len();
    // 64 GiB, sparse: reading it whole would need 64 GiB of memory (and abort the process).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let fresh = chunked_manager(&dir, 1 << 30);
    let (tokens_after, state_after) = state_of(&fresh, "a");
    assert_eq!(tokens_after, tokens);
    assert_eq!(fresh.stats().recomputed_tokens as usize, tokens.len());
    // Removed as corrupt, decoded again and offered again: a chunk of the sound length is back.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), sound_len);
    assert_eq!(state_after.len(), state.len());
}
