//! Chat: turns on a session. A [`SessionTurn`] is the exclusive right to change one session's conversation
//! (see [`SessionManager::begin_turn`]); a [`ChatTurn`] is a chat turn whose answer is read piece by piece and
//! that keeps that right until it ends.

use std::str::FromStr;
use std::sync::Arc;

use super::ids::{checkpoint_key, validate_label};
use super::live::{lock, ManagedSession, TurnPermit};
use super::records::{split_metadata, StoredMessage};
use super::SessionManager;
use crate::context::generation::Generator;
use crate::context::{Context, GenerateOptions, Generation, Interrupt};
use crate::error::{shorten_for_message, Error, Result};
use crate::model::ChatMessage;
use llama_cpp_2::token::LlamaToken;

/// What a chat turn does when its conversation (system prompt, history, new message) and the `max_tokens`
/// reserved for its answer do not fit in a sequence. Either way the check runs before the turn starts, so an
/// answer never runs out of room half-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Drop the oldest whole turns (a user message and the answers after it) from the history, always keeping
    /// the system prompt, until the turn fits; the context is then re-encoded from the first token that
    /// differs (the system prompt's tokens are reused). The turn's stats count the turns dropped
    /// ([`crate::GenerationStats::dropped_turns`]). [`Error::ChatOverflow`], nothing changed, only when the
    /// system prompt, the new message and `max_tokens` alone do not fit.
    #[default]
    DropOldest,
    /// [`Error::ChatOverflow`] before the turn starts, nothing changed: trim the history
    /// ([`SessionManager::trim_history`]) or ask for fewer tokens.
    Error,
}

impl OverflowPolicy {
    /// "drop_oldest" or "error".
    pub fn as_str(self) -> &'static str {
        match self {
            OverflowPolicy::DropOldest => "drop_oldest",
            OverflowPolicy::Error => "error",
        }
    }
}

impl FromStr for OverflowPolicy {
    type Err = Error;

    /// "drop_oldest" or "error"; anything else is [`Error::InvalidParameter`] naming `overflow`.
    fn from_str(s: &str) -> Result<OverflowPolicy> {
        match s {
            "drop_oldest" => Ok(OverflowPolicy::DropOldest),
            "error" => Ok(OverflowPolicy::Error),
            other => Err(Error::invalid(
                "overflow",
                "\"drop_oldest\" or \"error\"",
                format!("{other:?}"),
            )),
        }
    }
}

/// Where each turn of `history` starts: at each user message (messages before the first one belong to the
/// first turn).
fn turn_starts(history: &[StoredMessage]) -> Vec<usize> {
    let mut starts: Vec<usize> = history
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "user")
        .map(|(i, _)| i)
        .collect();
    if !history.is_empty() && starts.first() != Some(&0) {
        starts.insert(0, 0);
    }
    starts
}

/// How many messages the first `turns` turns of a history with these turn starts take.
fn messages_in_turns(starts: &[usize], history_len: usize, turns: usize) -> usize {
    starts.get(turns).copied().unwrap_or(history_len)
}

/// A chat turn that fits: the tokens to decode from, and how much of the history they leave out.
struct ChatPlan {
    tokens: Vec<LlamaToken>,
    dropped_messages: usize,
    dropped_turns: usize,
}

/// The exclusive right to change one live session's conversation, from [`SessionManager::begin_turn`]: while
/// it is held, no other turn runs on the session and the session is not evicted. Each method uses it up; so
/// does dropping it.
pub struct SessionTurn<'m> {
    manager: &'m SessionManager,
    permit: TurnPermit,
}

impl std::fmt::Debug for SessionTurn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTurn")
            .field("session", &self.session().id)
            .finish_non_exhaustive()
    }
}

impl<'m> SessionTurn<'m> {
    pub(super) fn new(manager: &'m SessionManager, permit: TurnPermit) -> SessionTurn<'m> {
        SessionTurn { manager, permit }
    }

    fn session(&self) -> &Arc<ManagedSession> {
        self.permit.session()
    }

    /// The session this turn runs on.
    pub fn session_id(&self) -> &str {
        &self.session().id
    }

    /// One chat turn: `user_message` is formatted with the model's chat template after the history, only
    /// what the context does not hold yet is decoded, and the answer is generated; both messages join the
    /// history. Room for `max_tokens` is reserved first, as the manager's [`OverflowPolicy`] says. Saved when
    /// the manager autosaves; the turn's stats become the context's [`Context::last_stats`].
    pub fn chat(
        self,
        user_message: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generation> {
        let manager = self.manager;
        let mut turn = self.start_chat(user_message, options, interrupt)?;
        while turn.next_piece(interrupt)?.is_some() {}
        turn.finish(manager)
    }

    /// Starts a chat turn whose answer is read piece by piece ([`ChatTurn::next_piece`]); the turn joins the
    /// history when [`ChatTurn::finish`] is called, and holds the session until then (or until dropped).
    pub fn start_chat(
        self,
        user_message: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<ChatTurn> {
        // The record is only read (the history changes when the turn finishes): the permit keeps other turns
        // from changing it meanwhile.
        let (system_prompt, history) = {
            let record = lock(&self.session().record);
            (
                record.manager.system_prompt.clone(),
                record.manager.history.clone(),
            )
        };
        self.start_turn(system_prompt, history, user_message, options, interrupt)
    }

    /// One chat turn on a whole conversation: `messages` (an optional first "system" message, the history,
    /// and last the new "user" message) replaces the session's system prompt and history, only what follows
    /// the longest common prefix of its tokens with what the context holds is decoded, and the answer is
    /// generated and joins the history. This is the turn of a client that sends the whole conversation every
    /// time (an OpenAI-style request): a conversation that continues the stored one decodes only its new
    /// messages; one that was edited decodes from the first token that differs. Room for `max_tokens` is
    /// reserved first, as the manager's [`OverflowPolicy`] says.
    pub fn chat_messages(
        self,
        messages: &[ChatMessage],
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generation> {
        let manager = self.manager;
        let mut turn = self.start_chat_messages(messages, options, interrupt)?;
        while turn.next_piece(interrupt)?.is_some() {}
        turn.finish(manager)
    }

    /// [`SessionTurn::chat_messages`] with the answer read piece by piece: the conversation replaces the
    /// session's when [`ChatTurn::finish`] is called (a turn dropped or closed before that changes no
    /// history).
    pub fn start_chat_messages(
        self,
        messages: &[ChatMessage],
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<ChatTurn> {
        let (system_prompt, history, user_message) = split_conversation(messages)?;
        self.start_turn(system_prompt, history, &user_message, options, interrupt)
    }

    /// Starts the turn that answers `user_message` after `system_prompt` and `history` (which become the
    /// session's when the turn finishes).
    fn start_turn(
        self,
        system_prompt: Option<String>,
        history: Vec<StoredMessage>,
        user_message: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<ChatTurn> {
        let session = Arc::clone(self.session());
        let context = lock(&session.context);
        let plan = self.manager.plan_chat(
            system_prompt.as_deref(),
            &history,
            user_message,
            options.max_tokens,
            &context,
        )?;
        // Everything the turn may decode, reserved in a pool's shared cache before it starts.
        let mut context = self.manager.reserve_turn_cells(
            &session,
            context,
            plan.tokens.len() + options.max_tokens,
        )?;
        let kept_history = history[plan.dropped_messages..].to_vec();
        let boundaries = self.manager.message_ends(
            system_prompt.as_deref(),
            &kept_history,
            &plan,
            user_message,
            &context,
        )?;
        let generator = context
            .start_generation_reusing_prefix_at(0, &plan.tokens, &boundaries, options, interrupt)?
            .0;
        drop(context);
        Ok(ChatTurn {
            permit: self.permit,
            system_prompt,
            kept_history,
            user_message: user_message.to_owned(),
            generator,
            text: String::new(),
            dropped_turns: plan.dropped_turns,
        })
    }

    /// Keeps the last `keep_last` turns of the history (a turn: a user message and the answers after it) and
    /// drops the older ones; the system prompt stays. Returns how many turns were dropped (0: nothing
    /// changed). The context is re-encoded from the first token that differs on the next chat turn. Saved
    /// when the manager autosaves.
    pub fn trim_history(self, keep_last: usize) -> Result<usize> {
        let session = Arc::clone(self.session());
        let mut record = lock(&session.record);
        let starts = turn_starts(&record.manager.history);
        let dropped_turns = starts.len().saturating_sub(keep_last);
        if dropped_turns == 0 {
            return Ok(0);
        }
        let dropped_messages =
            messages_in_turns(&starts, record.manager.history.len(), dropped_turns);
        record.manager.history.drain(..dropped_messages);
        record.mark_changed();
        let context = lock(&session.context);
        self.manager.autosave_changed(&session, record, context)?;
        Ok(dropped_turns)
    }

    /// Generates after `full_prompt`, the *whole* text the context should hold: only what follows the
    /// longest common prefix with what it holds is decoded. Returns the generation and the number of tokens
    /// reused; its stats become the context's [`Context::last_stats`]. The chat history is not changed.
    pub fn generate_reusing_prefix(
        self,
        full_prompt: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generation, usize)> {
        // What changed in the context is seen by its epoch: nothing to note in the record.
        let session = Arc::clone(self.session());
        let tokens = self.manager.model().tokenize(full_prompt, true, true)?;
        // As a chat turn does: all it may decode, reserved in a pool's shared cache first.
        let mut context = self.manager.reserve_turn_cells(
            &session,
            lock(&session.context),
            tokens.len() + options.max_tokens,
        )?;
        let (mut generator, reused) =
            context.start_generation_reusing_prefix_tokens(0, &tokens, options, interrupt)?;
        let mut text = String::new();
        while let Some(piece) = generator.next_piece(&mut context, interrupt)? {
            text.push_str(&piece);
        }
        let generation = generator.into_generation(text);
        context.set_last_stats(Some((generation.stats, generation.stop_reason)));
        Ok((generation, reused))
    }

    /// Puts the session back to checkpoint `label`: state and history. The session is then changed relative
    /// to what is stored (save it, or let autosave do it now).
    pub fn revert(self, label: &str) -> Result<()> {
        validate_label(label)?;
        let session = Arc::clone(self.session());
        let key = checkpoint_key(&session.id, label);
        let mut record = lock(&session.record);
        let mut context = lock(&session.context);
        let bytes = super::records::read_session_value(
            self.manager.store.as_ref(),
            &key,
            &key,
            &context,
            self.manager.key().is_some(),
        )?
        .ok_or_else(|| Error::SessionNotFound { id: key.clone() })?;
        let info = context.restore_named(&bytes, None, &key, self.manager.key())?;
        let (manager, user_metadata) = split_metadata(info.header.metadata);
        record.manager.history = manager.history;
        record.manager.system_prompt = manager.system_prompt;
        record.user_metadata = user_metadata;
        record.mark_changed();
        self.manager.autosave_changed(&session, record, context)
    }
}

impl SessionManager {
    /// The tokens of a chat turn after the conversation `system`, `history`, with room for `max_tokens` more in `context`:
    /// the whole history if it fits, else as the overflow policy says (the oldest turns dropped, or
    /// [`Error::ChatOverflow`]). Changes nothing.
    fn plan_chat(
        &self,
        system: Option<&str>,
        history: &[StoredMessage],
        user_message: &str,
        max_tokens: usize,
        context: &Context,
    ) -> Result<ChatPlan> {
        let capacity = context.capacity();
        let fits = |tokens: &[LlamaToken]| tokens.len().saturating_add(max_tokens) <= capacity;
        let starts = turn_starts(history);
        let without = |turns: usize| {
            let dropped_messages = messages_in_turns(&starts, history.len(), turns);
            let tokens =
                self.conversation_tokens(system, &history[dropped_messages..], user_message)?;
            Ok::<_, Error>(ChatPlan {
                tokens,
                dropped_messages,
                dropped_turns: turns,
            })
        };
        let whole = without(0)?;
        if fits(&whole.tokens) {
            return Ok(whole);
        }
        let held = context.token_count(0)?;
        let overflow = |conversation_tokens: usize, history_dropped: bool, advice: &'static str| {
            Error::ChatOverflow {
                conversation_tokens,
                max_tokens,
                n_ctx: capacity,
                held,
                history_dropped,
                advice,
            }
        };
        let bare = without(starts.len())?;
        if !fits(&bare.tokens) {
            return Err(overflow(
                bare.tokens.len(),
                !history.is_empty(),
                "Use a shorter message or system prompt, a smaller max_tokens, or a larger n_ctx.",
            ));
        }
        if self.overflow == OverflowPolicy::Error {
            return Err(overflow(
                whole.tokens.len(),
                false,
                "Call trim_history(session_id, keep_last=N) to drop the oldest turns (or let the \
                 manager drop them: overflow=\"drop_oldest\"), or pass a smaller max_tokens.",
            ));
        }
        // The fewest oldest turns to drop: dropping more never makes the conversation longer, so search.
        let (mut too_few, mut enough) = (0, bare);
        while enough.dropped_turns - too_few > 1 {
            let middle = without(too_few + (enough.dropped_turns - too_few) / 2)?;
            if fits(&middle.tokens) {
                enough = middle;
            } else {
                too_few = middle.dropped_turns;
            }
        }
        Ok(enough)
    }

    /// The conversation (the system prompt, `history`, then `user_message`) formatted with the chat template
    /// and tokenized, ready for the assistant's answer. Message contents are plain text: only the template's
    /// markup becomes control tokens, so no user can forge a turn of another role
    /// ([`crate::Model::tokenize_chat`]).
    fn conversation_tokens(
        &self,
        system_prompt: Option<&str>,
        history: &[StoredMessage],
        user_message: &str,
    ) -> Result<Vec<LlamaToken>> {
        let messages = conversation_messages(system_prompt, history, user_message);
        self.model.tokenize_chat(&messages, true, true)
    }

    /// Where the messages of `plan`'s conversation (the system prompt, the history it keeps, the new message)
    /// end in its tokens, for a context that keeps state
    /// checkpoints there (recurrent and hybrid memory); nothing for the others.
    fn message_ends(
        &self,
        system_prompt: Option<&str>,
        kept_history: &[StoredMessage],
        plan: &ChatPlan,
        user_message: &str,
        context: &Context,
    ) -> Result<Vec<usize>> {
        if !context.keeps_checkpoints() {
            return Ok(Vec::new());
        }
        let messages = conversation_messages(system_prompt, kept_history, user_message);
        self.model.chat_message_ends(&messages, &plan.tokens)
    }
}

/// A whole conversation split into the system prompt (a first "system" message), the history, and the new
/// user message (the last message, which must be the user's).
fn split_conversation(
    messages: &[ChatMessage],
) -> Result<(Option<String>, Vec<StoredMessage>, String)> {
    let Some((last, before)) = messages.split_last() else {
        return Err(Error::invalid(
            "messages",
            "at least one message, the last from the user",
            "an empty list",
        ));
    };
    if last.role != "user" {
        return Err(Error::invalid(
            "messages",
            "a conversation whose last message is the user's (role \"user\"), to be answered",
            format!(
                "messages[{}].role = {:?}",
                messages.len() - 1,
                shorten_for_message(&last.role)
            ),
        ));
    }
    let (system_prompt, history) = match before.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first.content.clone()), rest),
        _ => (None, before),
    };
    let history = history
        .iter()
        .map(|m| StoredMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    Ok((system_prompt, history, last.content.clone()))
}

/// The messages of a conversation: the system prompt, the history, the new user message.
fn conversation_messages(
    system_prompt: Option<&str>,
    history: &[StoredMessage],
    user_message: &str,
) -> Vec<ChatMessage> {
    {
        let mut messages = Vec::with_capacity(history.len() + 2);
        if let Some(system) = system_prompt {
            messages.push(ChatMessage {
                role: "system".to_owned(),
                content: system.to_owned(),
            });
        }
        messages.extend(history.iter().map(ChatMessage::from));
        messages.push(ChatMessage {
            role: "user".to_owned(),
            content: user_message.to_owned(),
        });
        messages
    }
}

/// A chat turn in progress (see [`SessionTurn::start_chat`]). It holds its session until it is finished or
/// dropped, so that turns of one session never interleave and the session is not evicted under it.
pub struct ChatTurn {
    permit: TurnPermit,
    /// The session's system prompt once the turn finishes.
    system_prompt: Option<String>,
    /// The history before the new message once the turn finishes: what the conversation kept (the overflow
    /// policy may have dropped its oldest turns).
    kept_history: Vec<StoredMessage>,
    user_message: String,
    generator: Generator,
    text: String,
    /// The whole turns the overflow policy dropped from the start of the history.
    dropped_turns: usize,
}

impl std::fmt::Debug for ChatTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTurn")
            .field("session", &self.permit.session().id)
            .finish_non_exhaustive()
    }
}

impl ChatTurn {
    /// The next piece of the answer, or `None` when it is complete.
    pub fn next_piece(&mut self, interrupt: &mut dyn Interrupt) -> Result<Option<String>> {
        let mut context = lock(&self.permit.session().context);
        let piece = self.generator.next_piece(&mut context, interrupt)?;
        if let Some(piece) = &piece {
            self.text.push_str(piece);
        }
        Ok(piece)
    }

    /// Ends the turn: the rest of the answer is generated if it was not read, the turns the overflow policy
    /// dropped leave the history (a turn on a whole conversation replaces system prompt and history), the user
    /// message and the answer join it, the turn's stats become the
    /// context's [`Context::last_stats`], and the session is saved if the manager autosaves. The session is
    /// then the most recently used, and sessions over `max_live` that were kept for their turns are evicted.
    pub fn finish(mut self, manager: &SessionManager) -> Result<Generation> {
        while self.next_piece(&mut crate::NeverInterrupt)?.is_some() {}
        let ChatTurn {
            permit,
            system_prompt,
            kept_history,
            user_message,
            generator,
            text,
            dropped_turns,
        } = self;
        let mut generation = generator.into_generation(text);
        generation.stats.dropped_turns = dropped_turns;
        let session = Arc::clone(permit.session());
        let mut record = lock(&session.record);
        record.manager.system_prompt = system_prompt;
        record.manager.history = kept_history;
        record.manager.history.push(StoredMessage {
            role: "user".to_owned(),
            content: user_message,
        });
        record.manager.history.push(StoredMessage {
            role: "assistant".to_owned(),
            content: generation.text.clone(),
        });
        record.mark_changed();
        let mut context = lock(&session.context);
        context.set_last_stats(Some((generation.stats, generation.stop_reason)));
        let stored = manager.autosave_changed(&session, record, context);
        drop(permit);
        manager.live.touch(&session);
        manager.evict_over_capacity();
        stored?;
        Ok(generation)
    }

    /// The session this turn runs on.
    pub fn session_id(&self) -> &str {
        &self.permit.session().id
    }
}
