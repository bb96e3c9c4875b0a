//! Sampling settings and the llama.cpp sampler chain built from them.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::error::{Error, Result};

/// How the next token is chosen. `temperature == 0` is greedy and deterministic.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 for greedy; higher is more random.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 disables).
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probabilities add up to p (1.0 disables).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0.0 disables).
    pub min_p: f32,
    /// Penalise tokens seen in the last `repeat_last_n` tokens (1.0 disables).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: u32,
    /// Random seed; `None` draws one.
    pub seed: Option<u32>,
}

/// Tokens a generation may produce unless the caller says otherwise.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// The sampling defaults: the one home of these values. [`SamplingParams::default`], the Python binding's
/// signatures and the Python package's wrappers (through `_native.SAMPLING_DEFAULTS`) all read them from
/// here, and a test checks the stub against them.
pub const DEFAULT_SAMPLING: SamplingParams = SamplingParams {
    temperature: 0.8,
    top_k: 40,
    top_p: 0.95,
    min_p: 0.05,
    repeat_penalty: 1.0,
    repeat_last_n: 64,
    seed: None,
};

impl Default for SamplingParams {
    fn default() -> Self {
        DEFAULT_SAMPLING
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Checks the ranges, naming the first offending parameter.
    pub fn validate(&self) -> Result<()> {
        let finite_at_least = |name: &'static str, v: f32, min: f32| {
            if v.is_finite() && v >= min {
                Ok(())
            } else {
                Err(Error::invalid(name, format!("a finite number >= {min}"), v))
            }
        };
        finite_at_least("temperature", self.temperature, 0.0)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", "0 < top_p <= 1", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::invalid("min_p", "0 <= min_p <= 1", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(Error::invalid(
                "repeat_penalty",
                "a finite number > 0 (1.0 disables it)",
                self.repeat_penalty,
            ));
        }
        if i32::try_from(self.top_k).is_err() {
            return Err(Error::invalid("top_k", "top_k <= 2^31-1", self.top_k));
        }
        if i32::try_from(self.repeat_last_n).is_err() {
            return Err(Error::invalid(
                "repeat_last_n",
                "repeat_last_n <= 2^31-1",
                self.repeat_last_n,
            ));
        }
        Ok(())
    }

    /// Builds the sampler chain, primed with the tokens already in the sequence so that the repeat penalty
    /// sees them.
    pub(crate) fn build(&self, n_vocab: i32, history: &[LlamaToken]) -> LlamaSampler {
        let mut chain = Vec::new();
        let penalised = self.repeat_penalty != 1.0 && self.repeat_last_n > 0;
        if penalised {
            let last_n = i32::try_from(self.repeat_last_n).unwrap_or(i32::MAX);
            chain.push(LlamaSampler::penalties(
                n_vocab,
                last_n,
                self.repeat_penalty,
                0.0,
                0.0,
            ));
        }
        if self.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if self.top_k > 0 {
                chain.push(LlamaSampler::top_k(
                    i32::try_from(self.top_k).unwrap_or(i32::MAX),
                ));
            }
            chain.push(LlamaSampler::top_p(self.top_p, 1));
            chain.push(LlamaSampler::min_p(self.min_p, 1));
            chain.push(LlamaSampler::temp(self.temperature));
            chain.push(LlamaSampler::dist(self.seed.unwrap_or(u32::MAX)));
        }
        let mut sampler = LlamaSampler::chain_simple(chain);
        if penalised {
            let window = usize::try_from(self.repeat_last_n).unwrap_or(usize::MAX);
            sampler.accept_many(&history[history.len().saturating_sub(window)..]);
        }
        sampler
    }
}
