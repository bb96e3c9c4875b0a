//! Sessions as chunk manifests: how a [`crate::SessionManager`] stores a session so that what sessions share
//! (a system prompt, a document) is stored once. A manifest is a session in the usual envelope (header,
//! checksum, optional signature) whose one sequence's state is the chain of full chunks its header names,
//! kept in the context's [`PrefixCache`](crate::chunks::PrefixCache), followed by a tail of cells the
//! manifest carries itself (the partial last chunk, and any chunk whose exact bytes the cache does not
//! hold).
//!
//! A manifest names each chunk by its key (which tokens, under which parameters) and by the digest of its
//! bytes (which exact rows): a chunk recomputed by another context may differ in the last bits of a float,
//! and restoring it in place of this session's own rows would not be exact. Only chunks whose bytes this
//! context holds identically are named ([`Context`]'s per-sequence chunk digests); the others go into the
//! tail. On restore, a named chunk that is missing, damaged or replaced is not trusted: the sequence is
//! restored up to it and the rest of its tokens are decoded again.

use llama_cpp_2::token::LlamaToken;

use super::prefix::assembled_state;
use super::{Context, NeverInterrupt, SeqId};
use crate::chunks::codec::{chunk_digest, chunk_len, encode_cells, parse_chunk, ChunkView};
use crate::chunks::{ChunkKey, ChunkScope};
use crate::error::{Error, Result};
use crate::session::{to_tokens, Metadata, SessionInfo};
use crate::session_format::{
    self as format, ChunkManifest, ManifestChunk, OpenedSession, SequenceRecord,
};
use crate::signing::SessionKey;

/// A manifest written by [`Context::manifest_snapshot`].
#[derive(Debug, Clone)]
pub struct ManifestSnapshot {
    /// The manifest's bytes (a session in the usual envelope).
    pub bytes: Vec<u8>,
    /// The chunks it names, pinned in the cache's store ([`crate::chunks::ChunkStore::pin`]): the caller
    /// unpins them once the manifest is replaced or deleted, or was not written.
    pub pinned: Vec<ChunkKey>,
}

fn hex(bytes: &[u8; 32]) -> String {
    ChunkKey(*bytes).to_hex()
}

impl Context {
    /// Whether [`Context::manifest_snapshot`] can write this context's sessions as manifests: it consults a
    /// prefix cache, and its memory is one plain KV cache.
    pub fn writes_manifests(&self) -> bool {
        self.prefix_scope().is_some() && self.params.n_seq_max == 1
    }

    /// Sequence 0 of this context (which must have one sequence: [`Context::writes_manifests`]) as a chunk
    /// manifest with `metadata`, signed with `key` if given. The full chunks this context holds exactly as
    /// the cache does are named (and pinned so that no eviction removes them); a full chunk the cache lacks
    /// is written to it first; the rest of the cells are carried in the manifest.
    pub fn manifest_snapshot(
        &self,
        metadata: &Metadata,
        key: Option<&SessionKey>,
    ) -> Result<ManifestSnapshot> {
        let Some((cache, scope)) = self.prefix_scope().filter(|_| self.writes_manifests()) else {
            return Err(Error::Internal(
                "a manifest was asked of a context that writes none".to_owned(),
            ));
        };
        let store = cache.store();
        let keys = scope.chain(&self.sequences[0]);
        // llama.cpp's state of the sequence, copied out once: chunks the cache lacks and the tail are cut
        // from it.
        let state = self.sequence_state(0)?;
        // Pinned before they are looked at, so that no eviction slips between the look and the manifest.
        store.pin(&keys);
        let named = match self.name_held_chunks(&keys, &state) {
            Ok(named) => named,
            Err(e) => {
                store.unpin(&keys);
                return Err(e);
            }
        };
        let k = named.len();
        store.unpin(&keys[k..]);
        let built = self.manifest_with(named, &keys, &state, metadata, key);
        if built.is_err() {
            store.unpin(&keys[..k]);
        }
        built.map(|bytes| ManifestSnapshot {
            bytes,
            pinned: keys[..k].to_vec(),
        })
    }

    /// The longest chain of sequence 0's full chunks (`keys`) the cache holds exactly as this context does,
    /// writing the ones it lacks (cut from `state`, sequence 0's state).
    fn name_held_chunks(&self, keys: &[ChunkKey], state: &[u8]) -> Result<Vec<ManifestChunk>> {
        let (cache, scope) = self.prefix_scope().expect("checked by the caller");
        let layout = self
            .state_layout()
            .map_err(|r| Error::Internal(r.to_owned()))?;
        let store = cache.store();
        let seq: SeqId = 0;
        let n = self.sequences[0].len();
        let c = scope.chunk_tokens();
        let known = &self.chunk_digests[0];
        let mut named = Vec::new();
        for (i, chunk_key) in keys.iter().enumerate() {
            let digest = if i < known.len() && store.contains(chunk_key) {
                Some(known[i])
            } else {
                let bytes = encode_cells(state, layout, seq, n, i * c, c, chunk_key)
                    .map_err(Error::Internal)?;
                let ours = chunk_digest(&bytes).expect("an encoded chunk has a digest");
                match store.get(chunk_key, bytes.len())? {
                    // Someone else's computation of these tokens: named only if it is ours to the bit.
                    Some(held) => (held == bytes).then_some(ours),
                    None => store.put(chunk_key, &bytes).is_ok().then_some(ours),
                }
            };
            let Some(digest) = digest else { break };
            named.push(ManifestChunk {
                key: chunk_key.to_hex(),
                digest: hex(&digest),
            });
        }
        Ok(named)
    }

    /// The manifest's bytes: sequence 0 as the `named` chunks (the first of `keys`) and the cells after
    /// them (cut from `state`, sequence 0's state).
    fn manifest_with(
        &self,
        named: Vec<ManifestChunk>,
        keys: &[ChunkKey],
        state: &[u8],
        metadata: &Metadata,
        key: Option<&SessionKey>,
    ) -> Result<Vec<u8>> {
        let (cache, scope) = self.prefix_scope().expect("checked by the caller");
        let layout = self
            .state_layout()
            .map_err(|r| Error::Internal(r.to_owned()))?;
        let seq: SeqId = 0;
        let tokens = &self.sequences[0];
        let n = tokens.len();
        let c = scope.chunk_tokens();
        let k = named.len();
        let tail_tokens = &tokens[k * c..];
        let tail = if tail_tokens.is_empty() {
            Vec::new()
        } else {
            let tail_key = scope.key(keys[..k].last(), tail_tokens);
            encode_cells(state, layout, seq, n, k * c, n - k * c, &tail_key)
                .map_err(Error::Internal)?
        };
        let mut header = self.session_header(
            vec![SequenceRecord {
                seq,
                tokens: tokens.iter().map(|t| t.0).collect(),
                state_bytes: tail.len() as u64,
            }],
            metadata,
            key.is_some(),
        )?;
        header.chunks = Some(ChunkManifest {
            chunk_tokens: c as u32,
            namespace: cache.namespace().to_owned(),
            chunks: named,
        });
        let header_json = format::encode_header(&header)?;
        let mut out = vec![0; format::encoded_len(header_json.len(), tail.len(), key.is_some())];
        let range = format::write_prelude(&mut out, &header_json, tail.len());
        out[range].copy_from_slice(&tail);
        format::seal(&mut out, key);
        Ok(out)
    }

    /// Restores a verified manifest (`opened`, from `bytes`; compatibility already checked) into sequence
    /// `seq` (`None`: its own, the others emptied). Every check of what the manifest says runs before the
    /// context changes; chunks are then fetched, and the first one that is missing or not the one named ends
    /// the restored chain: the tokens from there are decoded. The returned info counts those. A refusal
    /// leaves the context as it was; a decode that fails while recomputing leaves the destination emptied
    /// (with `seq` None: the whole context).
    pub(super) fn restore_manifest(
        &mut self,
        bytes: &[u8],
        opened: OpenedSession,
        seq: Option<SeqId>,
        origin: &str,
    ) -> Result<SessionInfo> {
        let corrupt = |reason: String| Error::SessionCorrupt {
            origin: origin.to_owned(),
            reason,
        };
        let manifest = opened
            .header
            .chunks
            .clone()
            .ok_or_else(|| Error::Internal("not a manifest".to_owned()))?;
        let Some((cache, scope)) = self.prefix_scope() else {
            return Err(Error::SessionVersion {
                origin: origin.to_owned(),
                reason: "it is a chunk manifest (how a SessionManager stores a session): its KV rows live \
                         in the manager's chunk store, which this context does not use. Load it with the \
                         SessionManager, or write it as one file with `llama-sessions export ID FILE`"
                    .to_owned(),
            });
        };
        if manifest.chunk_tokens as usize != scope.chunk_tokens()
            || manifest.namespace != cache.namespace()
        {
            return Err(Error::SessionVersion {
                origin: origin.to_owned(),
                reason: format!(
                    "it is a chunk manifest of {}-token chunks in namespace {:?}; this context's cache uses \
                     {}-token chunks in namespace {:?}",
                    manifest.chunk_tokens,
                    manifest.namespace,
                    scope.chunk_tokens(),
                    cache.namespace()
                ),
            });
        }
        let [record] = opened.header.sequences.as_slice() else {
            return Err(corrupt(format!(
                "a chunk manifest holds one sequence, this one {}",
                opened.header.sequences.len()
            )));
        };
        let dest = seq.unwrap_or(record.seq);
        self.check_seq(dest)?;
        let layout = self
            .state_layout()
            .map_err(|r| Error::Internal(r.to_owned()))?
            .clone();
        let store = cache.store().clone();
        let scope: ChunkScope = *scope;
        let c = scope.chunk_tokens();
        let tokens: Vec<LlamaToken> = to_tokens(&record.tokens);
        let n = tokens.len();
        let k = manifest.chunks.len();
        if k.checked_mul(c).is_none_or(|full| full > n) {
            return Err(corrupt(format!(
                "it names {k} chunks of {c} tokens for a sequence of {n} tokens"
            )));
        }
        let keys = scope.chain(&tokens[..k * c]);
        let mut digests = Vec::with_capacity(k);
        for (i, (named, key)) in manifest.chunks.iter().zip(&keys).enumerate() {
            if named.key != key.to_hex() {
                return Err(corrupt(format!(
                    "chunk {i} is named {:?}, but its tokens under this context's parameters give key {}",
                    named.key,
                    key.to_hex()
                )));
            }
            let digest = ChunkKey::from_hex(&named.digest)
                .ok_or_else(|| corrupt(format!("chunk {i}'s digest is not 64 hex digits")))?;
            digests.push(digest.0);
        }
        let tail = &bytes[opened.state_ranges[0].clone()];
        let tail_view = if n > k * c {
            let tail_key = scope.key(keys.last(), &tokens[k * c..]);
            Some(
                parse_chunk(tail, &tail_key, k * c, n - k * c, &layout)
                    .map_err(|reason| corrupt(format!("its tail of cells: {reason}")))?,
            )
        } else if !tail.is_empty() {
            return Err(corrupt(format!(
                "its chunks hold all {n} tokens, yet it carries {} more bytes",
                tail.len()
            )));
        } else {
            None
        };
        // The chunks, in order, up to the first that is missing; then each is checked (once: the views
        // borrow the bytes) up to the first that is not the one named.
        let max_len = chunk_len(&layout, c).unwrap_or(0);
        let mut fetched: Vec<Vec<u8>> = Vec::with_capacity(k);
        for key in &keys {
            let Some(found) = store.get(key, max_len)? else {
                break;
            };
            fetched.push(found);
        }
        let mut views: Vec<ChunkView<'_>> = Vec::with_capacity(k + 1);
        let mut unsound = None;
        for (i, found) in fetched.iter().enumerate() {
            if chunk_digest(found) != Some(digests[i]) {
                // Another computation of these tokens (not this session's rows), or damaged.
                if crate::chunks::codec::check_integrity(found, &keys[i]).is_err() {
                    unsound = Some(i);
                }
                break;
            }
            match parse_chunk(found, &keys[i], i * c, c, &layout) {
                Ok(view) => views.push(view),
                Err(_) => {
                    unsound = Some(i);
                    break;
                }
            }
        }
        let sound = views.len();
        for _ in 0..sound {
            store.record_hit();
        }
        if let Some(i) = unsound {
            store.remove_corrupt(&keys[i])?;
        }
        let whole = sound == k;
        if whole {
            views.extend(tail_view);
        }
        let restored_tokens = if whole { n } else { sound * c };
        if seq.is_none() {
            self.reset();
        }
        if restored_tokens == 0 {
            self.remove_from(dest, 0)?;
        } else {
            let state = assembled_state(&views, &layout, dest)?;
            drop(views);
            if let Err(e) = self.replace_sequence(
                dest,
                &state,
                tokens[..restored_tokens].to_vec(),
                dest,
                origin,
            ) {
                if seq.is_none() {
                    self.reset();
                }
                return Err(e);
            }
            self.chunk_digests[dest as usize] = digests[..sound].to_vec();
        }
        let recomputed = n - restored_tokens;
        if recomputed > 0 {
            if let Err(e) =
                self.append(dest, &tokens[restored_tokens..], false, &mut NeverInterrupt)
            {
                // Not the session, and not what the context held before: emptied, as a refused restore
                // of the whole context leaves it.
                if seq.is_none() {
                    self.reset();
                } else {
                    self.remove_from(dest, 0)?;
                }
                return Err(e);
            }
            self.offer_to_prefix_cache(dest);
        }
        let mut info = SessionInfo::from_opened(opened);
        info.recomputed_tokens = recomputed;
        Ok(info)
    }
}
