//! The Context's use of a [`PrefixCache`]: before a prompt is decoded, the longest chain of cached chunks
//! that prefixes what the sequence will hold replaces the sequence (through [`Context::replace_sequence`],
//! which checks every byte), and afterwards every full chunk of the sequence that the cache lacks is offered
//! to it.

use llama_cpp_2::token::LlamaToken;

use super::{Context, SeqId};
use crate::chunks::codec::{
    assemble_into, assembled_len, chunk_digest, chunk_len, encode_chunk, parse_chunk, ChunkView,
    SliceSink,
};
use crate::chunks::{ChunkScope, PrefixCache};
use crate::error::{Error, Result};
use crate::llama_state::StateLayout;
use crate::model::Model;
use crate::params::ContextParams;

/// Where restored chunks come from, in error messages.
const ORIGIN: &str = "the prefix cache";

impl Context {
    /// Creates a context (as [`Context::new`]) that uses `cache` for every prompt it decodes.
    pub fn with_prefix_cache(
        model: &Model,
        params: ContextParams,
        cache: PrefixCache,
    ) -> Result<Context> {
        let mut ctx = Context::new(model, params)?;
        ctx.set_prefix_cache(Some(cache));
        Ok(ctx)
    }

    /// Uses `cache` (None: no cache) from the next prompt on. A context whose memory is not one plain KV
    /// cache keeps the cache but never consults it.
    pub fn set_prefix_cache(&mut self, cache: Option<PrefixCache>) {
        // What the old cache held says nothing about the new one.
        for digests in &mut self.chunk_digests {
            digests.clear();
        }
        self.prefix_cache = cache.map(|cache| {
            let scope = self.state_layout().ok().map(|layout| {
                ChunkScope::new(
                    self.model.fingerprint(),
                    &self.params,
                    layout,
                    cache.chunk_tokens(),
                    cache.namespace(),
                )
            });
            (cache, scope)
        });
    }

    /// The prefix cache this context uses.
    pub fn prefix_cache(&self) -> Option<&PrefixCache> {
        self.prefix_cache.as_ref().map(|(cache, _)| cache)
    }

    /// Tokens per chunk of the prefix cache this context consults (None: it consults none).
    pub(super) fn prefix_chunk_tokens(&self) -> Option<usize> {
        match &self.prefix_cache {
            Some((_, Some(scope))) => Some(scope.chunk_tokens()),
            _ => None,
        }
    }

    /// The cache and key scope of this context, when it consults a cache.
    pub(super) fn prefix_scope(&self) -> Option<(&PrefixCache, &ChunkScope)> {
        match &self.prefix_cache {
            Some((cache, Some(scope))) => Some((cache, scope)),
            _ => None,
        }
    }

    /// llama.cpp's state of sequence `seq`, as `llama_state_seq_get_data_ext` writes it.
    pub fn sequence_state(&self, seq: SeqId) -> Result<Vec<u8>> {
        self.check_seq(seq)?;
        let mut state = vec![0; self.sequence_state_len(seq)];
        self.write_sequence_state(seq, &mut state)?;
        Ok(state)
    }

    /// Before `tokens` are decoded after what sequence `seq` holds: restores the longest chain of cached
    /// chunks that prefixes the result, when it reaches beyond what the sequence holds. With `want_logits`,
    /// at least one token is left to decode (its logits are needed). Returns how many of `tokens` are now
    /// held. A chunk that fails its checks is removed from the cache and ends the chain (that prefix is
    /// decoded instead).
    pub(crate) fn restore_from_prefix_cache(
        &mut self,
        seq: SeqId,
        tokens: &[LlamaToken],
        want_logits: bool,
    ) -> Result<usize> {
        let Some((cache, Some(scope))) = &self.prefix_cache else {
            return Ok(0);
        };
        let Ok(layout) = self.state_layout() else {
            return Ok(0);
        };
        let held = self.sequences[seq as usize].len();
        let mut all = self.sequences[seq as usize].clone();
        all.extend_from_slice(tokens);
        let c = scope.chunk_tokens();
        let limit = if want_logits {
            all.len().saturating_sub(1)
        } else {
            all.len()
        };
        let usable = limit / c;
        if usable * c <= held {
            return Ok(0);
        }
        let keys = scope.chain(&all[..usable * c]);
        let store = cache.store();
        let max_len = chunk_len(layout, c).unwrap_or(0);
        let mut found = Vec::new();
        for key in &keys {
            let Some(bytes) = store.get(key, max_len)? else {
                break;
            };
            found.push(bytes);
        }
        // Each chunk checked once, in order (the views borrow the bytes); the first unsound one is removed
        // and ends the chain.
        let mut views = Vec::with_capacity(found.len());
        let mut digests = Vec::with_capacity(found.len());
        for (i, bytes) in found.iter().enumerate() {
            match parse_chunk(bytes, &keys[i], i * c, c, layout) {
                Ok(view) => {
                    store.record_hit();
                    digests.push(chunk_digest(bytes).expect("a parsed chunk has a digest"));
                    views.push(view);
                }
                Err(_) => {
                    store.remove_corrupt(&keys[i])?;
                    break;
                }
            }
        }
        let k = views.len();
        if k * c <= held {
            return Ok(0);
        }
        let state = assembled_state(&views, layout, seq)?;
        drop(views);
        match self.replace_sequence(seq, &state, all[..k * c].to_vec(), seq, ORIGIN) {
            Ok(()) => {
                self.chunk_digests[seq as usize] = digests;
                Ok(k * c - held)
            }
            // Refused before anything changed: decode instead.
            Err(Error::SessionCorrupt { .. } | Error::SessionVersion { .. }) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Offers every full chunk of sequence `seq` that the cache lacks. Best effort: a chunk that cannot be
    /// written is simply not cached.
    pub(crate) fn offer_to_prefix_cache(&mut self, seq: SeqId) {
        let Some((cache, Some(scope))) = &self.prefix_cache else {
            return;
        };
        let Ok(layout) = self.state_layout() else {
            return;
        };
        let tokens = &self.sequences[seq as usize];
        let keys = scope.chain(tokens);
        let store = cache.store();
        let missing: Vec<usize> = (0..keys.len())
            .filter(|&i| !store.contains(&keys[i]))
            .collect();
        if missing.is_empty() {
            return;
        }
        let Ok(state) = self.sequence_state(seq) else {
            return;
        };
        let mut written = Vec::new();
        for i in missing {
            let c = scope.chunk_tokens();
            if let Ok(bytes) = encode_chunk(&state, layout, seq, tokens.len(), c, i, &keys[i]) {
                if store.put(&keys[i], &bytes).is_ok() {
                    written.push((
                        i,
                        chunk_digest(&bytes).expect("an encoded chunk has a digest"),
                    ));
                }
            }
        }
        // A digest is known only when every chunk before it is (a manifest names a chain).
        let known = &mut self.chunk_digests[seq as usize];
        for (i, digest) in written {
            if known.len() == i {
                known.push(digest);
            }
        }
    }
}

/// A copy of a context's sequence 0 together with what its prefix cache knows of its chunks: what a
/// [`crate::SessionManager`] keeps of each encoded system prompt, to start other sessions from. Made only by
/// [`Context::copy_sequence_0`], so that the chunk digests it carries are those of its bytes.
#[derive(Debug, Clone)]
pub struct SequenceCopy {
    bytes: Vec<u8>,
    digests: Vec<[u8; 32]>,
    scope: Option<ChunkScope>,
}

impl Context {
    /// Sequence 0 (state, tokens, and the digests of the chunks the prefix cache holds of it identically).
    pub fn copy_sequence_0(&self) -> Result<SequenceCopy> {
        Ok(SequenceCopy {
            bytes: self.snapshot(Some(0), &crate::session::Metadata::new(), None)?,
            digests: self.chunk_digests[0].clone(),
            scope: self.prefix_scope().map(|(_, scope)| *scope),
        })
    }

    /// Replaces sequence 0 by `copy` (made by a context of the same model and parameters). The chunk digests
    /// carry over when this context uses a cache of the same scope (they describe that cache).
    pub fn restore_sequence_copy(&mut self, copy: &SequenceCopy) -> Result<()> {
        self.restore(&copy.bytes, Some(0), None)?;
        if copy.scope.is_some() && self.prefix_scope().map(|(_, scope)| *scope) == copy.scope {
            self.chunk_digests[0] = copy.digests.clone();
        }
        Ok(())
    }
}

/// The state of `views` assembled for sequence `seq`, in memory that costs a few page faults rather than one
/// per 4 KiB (the state of a few thousand tokens is tens of MB: see `durable::zeroed`).
pub(super) fn assembled_state(
    views: &[ChunkView<'_>],
    layout: &StateLayout,
    seq: SeqId,
) -> Result<crate::durable::FileBytes> {
    let len = assembled_len(views, layout);
    let mut state = crate::durable::zeroed(len).map_err(|source| Error::Io {
        op: "allocate memory for",
        path: std::path::PathBuf::from("an assembled KV state"),
        source,
    })?;
    let mut sink = SliceSink::new(&mut state);
    assemble_into(views, layout, seq, &mut sink);
    if sink.written() != len {
        return Err(Error::Internal(format!(
            "assembled {} bytes of state, expected {len}",
            sink.written()
        )));
    }
    Ok(state)
}
