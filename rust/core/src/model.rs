//! A loaded GGUF model: tokenizer, chat template, metadata and content fingerprint.
//!
//! A [`Model`] is a cheap handle (`Arc` inside): clone it to share one set of weights between many
//! [`crate::Context`]s and threads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use crate::backend::{backend, clear_recent_log, take_recent_log};
use crate::error::{shorten_for_message, Error, Result};
use crate::gguf;

/// How a model is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelParams {
    /// Layers to offload to a GPU (0 on a CPU-only build).
    pub n_gpu_layers: u32,
    /// Map the file instead of reading it into memory.
    pub use_mmap: bool,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            n_gpu_layers: 0,
            use_mmap: true,
        }
    }
}

/// Architectures whose layers llama.cpp splits into full and sliding-window attention with two KV caches
/// (`llama_kv_cache_iswa`) when the model has a window, with the standard window (a token sees the last
/// `n_swa` positions). Others with a window (llama4's chunks, for one) are not listed: their states are
/// refused rather than checked by the wrong rule.
const SLIDING_WINDOW_ARCHITECTURES: [&str; 4] = ["gemma2", "gemma3", "cohere2", "gpt-oss"];

/// How a model's memory of a sequence is kept by llama.cpp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// One KV cache: one cell per token, any suffix can be dropped.
    Attention,
    /// Full-attention layers in one KV cache, sliding-window layers in another; a saved state keeps the
    /// window's last `n_swa` positions of the latter.
    SlidingWindow,
    /// Attention layers in a KV cache and recurrent layers in a state per sequence.
    Hybrid,
    /// Recurrent layers only: one state per sequence, which cannot be cut back to an earlier position.
    Recurrent,
}

impl MemoryKind {
    /// "attention", "sliding_window", "hybrid" or "recurrent".
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Attention => "attention",
            MemoryKind::SlidingWindow => "sliding_window",
            MemoryKind::Hybrid => "hybrid",
            MemoryKind::Recurrent => "recurrent",
        }
    }

    /// Whether llama.cpp can drop the end of a sequence in place. Where it cannot (recurrent state), a
    /// truncate decodes the kept tokens again from the start (see `Context::truncate`).
    pub fn partial_truncation(self) -> bool {
        matches!(self, MemoryKind::Attention | MemoryKind::SlidingWindow)
    }
}

/// One chat message for [`Model::apply_chat_template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// "system", "user", "assistant", ...
    pub role: String,
    /// The message text.
    pub content: String,
}

pub(crate) struct ModelInner {
    pub(crate) llama: LlamaModel,
    path: PathBuf,
    fingerprint: String,
    metadata: BTreeMap<String, String>,
}

/// A GGUF model loaded by llama.cpp. Immutable; `Clone` shares it.
#[derive(Clone)]
pub struct Model {
    pub(crate) inner: Arc<ModelInner>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.inner.path)
            .field("architecture", &self.architecture())
            .field("fingerprint", &self.inner.fingerprint)
            .finish()
    }
}

impl Model {
    /// Loads the GGUF file at `path`. The header is parsed and fingerprinted by us first, so that a missing,
    /// non-GGUF or truncated file gets a precise [`Error::ModelLoad`] before llama.cpp reads it.
    pub fn load(path: impl AsRef<Path>, params: &ModelParams) -> Result<Model> {
        let path = path.as_ref();
        let fail = |reason: String| Error::ModelLoad {
            path: path.to_path_buf(),
            reason,
        };
        if !path.exists() {
            return Err(fail("no such file".into()));
        }
        if path.is_dir() {
            return Err(fail("expected a GGUF file, found a directory".into()));
        }
        if path.to_str().is_none() {
            return Err(fail(
                "the path is not valid UTF-8, which llama.cpp requires".into(),
            ));
        }
        let summary = gguf::inspect(path)?;
        let backend = backend()?;
        let llama_params = LlamaModelParams::default()
            .with_n_gpu_layers(params.n_gpu_layers)
            .with_use_mmap(params.use_mmap);
        clear_recent_log();
        let llama = LlamaModel::load_from_file(backend, path, &llama_params)
            .map_err(|e| fail(take_recent_log(&e.to_string())))?;
        let metadata = read_metadata(&llama);
        Ok(Model {
            inner: Arc::new(ModelInner {
                llama,
                path: path.to_path_buf(),
                fingerprint: summary.fingerprint,
                metadata,
            }),
        })
    }

    /// The path the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A short string identifying the model's content (see [`crate::gguf`] for what it covers).
    pub fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    /// The GGUF's metadata, every value rendered as a string by llama.cpp.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.inner.metadata
    }

    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> &str {
        self.inner
            .metadata
            .get("general.architecture")
            .map_or("", String::as_str)
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        usize::try_from(self.inner.llama.n_vocab()).unwrap_or(0)
    }

    /// The context length the model was trained with.
    pub fn n_ctx_train(&self) -> u32 {
        self.inner.llama.n_ctx_train()
    }

    /// Number of layers.
    pub fn n_layer(&self) -> u32 {
        self.inner.llama.n_layer()
    }

    /// Embedding width.
    pub fn n_embd(&self) -> u32 {
        u32::try_from(self.inner.llama.n_embd()).unwrap_or(0)
    }

    /// How llama.cpp keeps this model's memory of a sequence, which decides what a state holds and whether a
    /// sequence can be cut back (see [`MemoryKind`]).
    pub fn memory_kind(&self) -> MemoryKind {
        let llama = &self.inner.llama;
        if llama.is_hybrid() {
            MemoryKind::Hybrid
        } else if llama.is_recurrent() {
            MemoryKind::Recurrent
        } else if self.n_swa() > 0 {
            MemoryKind::SlidingWindow
        } else {
            MemoryKind::Attention
        }
    }

    /// The sliding window in tokens of an architecture whose sliding-window layers llama.cpp runs with a
    /// window cache, 0 for the others (a `sliding_window` key alone does not make one: llama.cpp ignores it in
    /// many architectures, and writes it, as 0, for all).
    pub fn n_swa(&self) -> u32 {
        if !SLIDING_WINDOW_ARCHITECTURES.contains(&self.architecture())
            && !self.inner.llama.is_hybrid()
        {
            return 0;
        }
        self.inner
            .metadata
            .get(&format!("{}.attention.sliding_window", self.architecture()))
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    }

    /// The model's default chat template (Jinja source), if it has one.
    pub fn chat_template(&self) -> Option<String> {
        self.inner
            .llama
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok())
    }

    /// Beginning-of-sequence token, when the model's tokenizer adds one to a fresh sequence.
    pub fn bos_to_add(&self) -> Option<LlamaToken> {
        let vocab = self.inner.llama.vocab();
        vocab.should_add_bos().then(|| vocab.bos())
    }

    /// Whether `token` ends a generation (end-of-sequence, end-of-turn, ...).
    pub fn is_end_of_generation(&self, token: LlamaToken) -> bool {
        self.inner.llama.vocab().is_eog(token)
    }

    /// Turns text into token ids. `add_bos` adds the beginning-of-sequence token when the model uses one;
    /// `special` parses special-token text such as `<|im_start|>` into its control token (otherwise such text
    /// is tokenized as plain text).
    pub fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> Result<Vec<LlamaToken>> {
        if i32::try_from(text.len()).is_err() {
            return Err(Error::Tokenize(format!(
                "text of {} bytes: expected at most {} bytes",
                text.len(),
                i32::MAX
            )));
        }
        let vocab = self.inner.llama.vocab();
        let mut tokens = vocab.tokenize(text.as_bytes(), false, special);
        if add_bos && vocab.should_add_bos() && tokens.first() != Some(&vocab.bos()) {
            tokens.insert(0, vocab.bos());
        }
        Ok(tokens)
    }

    /// Checks that every id is in the vocabulary. llama.cpp indexes its tables with token ids unchecked, so
    /// every id from outside must pass here before it reaches llama.cpp.
    pub fn check_tokens(&self, tokens: &[LlamaToken]) -> Result<()> {
        let n_vocab = self.inner.llama.n_vocab();
        match tokens.iter().find(|t| t.0 < 0 || t.0 >= n_vocab) {
            Some(bad) => Err(Error::Tokenize(format!(
                "token id {}: expected 0 <= id < {n_vocab} (the vocabulary size)",
                bad.0
            ))),
            None => Ok(()),
        }
    }

    /// The bytes of one token's text. Control tokens render as their text (e.g. `<|im_end|>`) when
    /// `special` is true and as nothing otherwise.
    pub fn token_bytes(&self, token: LlamaToken, special: bool) -> Result<Vec<u8>> {
        self.check_tokens(&[token])?;
        Ok(self
            .inner
            .llama
            .vocab()
            .token_to_piece(token, special, None))
    }

    /// Turns token ids back into text. Invalid UTF-8 (a multi-byte character cut in half) is replaced by
    /// U+FFFD.
    pub fn detokenize(&self, tokens: &[LlamaToken], special: bool) -> Result<String> {
        self.check_tokens(tokens)?;
        let mut bytes = Vec::new();
        for &token in tokens {
            bytes.extend(
                self.inner
                    .llama
                    .vocab()
                    .token_to_piece(token, special, None),
            );
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The token counts at which the messages of `messages` end in `tokens` (its [`Model::tokenize_chat`]
    /// with the generation prompt): for each leading run of messages whose own formatting is a prefix of
    /// `tokens`, that prefix's length, in increasing order. A chat template that formats a message
    /// differently when more follow yields fewer boundaries, never a wrong one.
    pub fn chat_message_ends(
        &self,
        messages: &[ChatMessage],
        tokens: &[LlamaToken],
    ) -> Result<Vec<usize>> {
        let mut ends = Vec::new();
        for k in 1..messages.len() {
            let prefix = self.tokenize_chat(&messages[..k], false, true)?;
            if tokens.starts_with(&prefix) && ends.last() != Some(&prefix.len()) {
                ends.push(prefix.len());
            }
        }
        Ok(ends)
    }

    /// Tokens of `messages` formatted with the model's chat template, where only the template's own markup
    /// can become control tokens: each message's content is tokenized as plain text, so a user who writes
    /// `<|im_start|>system` gets those characters, not a system turn. (The template is rendered around
    /// placeholders; the markup between them is tokenized with special-token parsing, the contents without.)
    pub fn tokenize_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        add_bos: bool,
    ) -> Result<Vec<LlamaToken>> {
        for (i, message) in messages.iter().enumerate() {
            check_role(i, &message.role)?;
        }
        // Placeholders of private-use characters with a nonce, so that no message can contain one.
        let nonce = blake3::hash(
            messages
                .iter()
                .flat_map(|m| [m.role.as_bytes(), m.content.as_bytes()])
                .flatten()
                .copied()
                .collect::<Vec<u8>>()
                .as_slice(),
        )
        .to_hex();
        let placeholder = |i: usize| format!("\u{E000}{}{i}\u{E001}", &nonce[..16]);
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                role: m.role.clone(),
                content: placeholder(i),
            })
            .collect();
        let mut rest = self.apply_chat_template(&masked, add_generation_prompt)?;
        let mut tokens = Vec::new();
        let mut first = add_bos;
        for (i, message) in messages.iter().enumerate() {
            let marker = placeholder(i);
            let Some((markup, after)) = rest.split_once(&marker) else {
                return Err(Error::ChatTemplate(format!(
                    "the chat template dropped or changed message {i}'s content; it cannot be tokenized safely"
                )));
            };
            tokens.extend(self.tokenize(markup, first, true)?);
            tokens.extend(self.tokenize(&message.content, false, false)?);
            first = false;
            rest = after.to_owned();
        }
        tokens.extend(self.tokenize(&rest, first, true)?);
        Ok(tokens)
    }

    /// Formats a conversation with the model's own chat template (llama.cpp's built-in template engine, which
    /// recognises the common templates; not a full Jinja engine).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template =
            self.inner.llama.chat_template(None).map_err(|e| {
                Error::ChatTemplate(format!("the model has no chat template ({e})"))
            })?;
        let messages = messages
            .iter()
            .map(|m| {
                LlamaChatMessage::new(m.role.clone(), m.content.clone())
                    .map_err(|e| Error::ChatTemplate(format!("message with a NUL byte: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.inner
            .llama
            .apply_chat_template(&template, &messages, add_generation_prompt)
            .map_err(|e| {
                Error::ChatTemplate(format!(
                    "llama.cpp could not apply the model's template ({e}); it supports the common built-in \
                     templates only"
                ))
            })
    }
}

/// Longest role name [`Model::tokenize_chat`] accepts.
const MAX_ROLE_BYTES: usize = 32;

/// A role is rendered into the template's markup, which is tokenized with special-token parsing: only a
/// plain name (ASCII letters, digits, `_` and `-`) may go there, or a role such as
/// `"user<|im_end|><|im_start|>system"` would open a turn of another role.
fn check_role(index: usize, role: &str) -> Result<()> {
    let plain = !role.is_empty()
        && role.len() <= MAX_ROLE_BYTES
        && role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        return Ok(());
    }
    Err(Error::invalid(
        "messages",
        format!(
            "every role a name of 1 to {MAX_ROLE_BYTES} ASCII letters, digits, '_' or '-' (\"system\", \
             \"user\", \"assistant\", ...)"
        ),
        format!("messages[{index}].role = {:?}", shorten_for_message(role)),
    ))
}

fn read_metadata(model: &LlamaModel) -> BTreeMap<String, String> {
    (0..model.meta_count())
        .filter_map(|i| {
            let key = model.meta_key_by_index(i).ok()?;
            let value = model.meta_val_str_by_index(i).ok()?;
            Some((key, value))
        })
        .collect()
}
