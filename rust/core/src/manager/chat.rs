//! Chat: turns on a session. A [`SessionTurn`] is the exclusive right to change one session's conversation
//! (see [`SessionManager::begin_turn`]); a [`ChatTurn`] is a chat turn whose answer is read piece by piece and
//! that keeps that right until it ends.

use std::sync::Arc;

use super::ids::{checkpoint_key, validate_label};
use super::live::{lock, ManagedSession, TurnPermit};
use super::records::{split_metadata, ManagerRecord, StoredMessage};
use super::SessionManager;
use crate::context::generation::Generator;
use crate::context::{GenerateOptions, Generation, Interrupt};
use crate::error::{Error, Result};
use crate::model::ChatMessage;
use llama_cpp_2::token::LlamaToken;

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
    /// history. Saved when the manager autosaves.
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
        let session = Arc::clone(self.session());
        // The record is only read: the permit keeps other turns from changing it meanwhile.
        let tokens = {
            let record = lock(&session.record);
            self.manager
                .conversation_tokens(&record.manager, user_message)?
        };
        let generator = lock(&session.context)
            .start_generation_reusing_prefix_tokens(0, &tokens, options, interrupt)?
            .0;
        Ok(ChatTurn {
            permit: self.permit,
            user_message: user_message.to_owned(),
            generator,
            text: String::new(),
        })
    }

    /// Generates after `full_prompt`, the *whole* text the context should hold: only what follows the
    /// longest common prefix with what it holds is decoded. Returns the generation and the number of tokens
    /// reused. The chat history is not changed.
    pub fn generate_reusing_prefix(
        self,
        full_prompt: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generation, usize)> {
        // What changed in the context is seen by its epoch: nothing to note in the record.
        lock(&self.session().context).generate_reusing_prefix(0, full_prompt, options, interrupt)
    }

    /// Puts the session back to checkpoint `label`: state and history. The session is then changed relative
    /// to what is stored (save it, or let autosave do it now).
    pub fn revert(self, label: &str) -> Result<()> {
        validate_label(label)?;
        let session = Arc::clone(self.session());
        let key = checkpoint_key(&session.id, label);
        let bytes = self
            .manager
            .store
            .get(&key)?
            .ok_or_else(|| Error::SessionNotFound { id: key.clone() })?;
        let mut record = lock(&session.record);
        let mut context = lock(&session.context);
        let info = context.restore_named(&bytes, None, &key, self.manager.key())?;
        let (manager, user_metadata) = split_metadata(info.header.metadata);
        record.manager.history = manager.history;
        record.manager.system_prompt = manager.system_prompt;
        record.user_metadata = user_metadata;
        record.mark_changed();
        if self.manager.autosave {
            let stored = self
                .manager
                .store_record(&session.id, &mut record, &context);
            drop(context);
            drop(record);
            self.manager.forget_if_conflict(&session, stored)?;
        }
        Ok(())
    }
}

impl SessionManager {
    /// The whole conversation formatted with the chat template and tokenized, ready for the assistant's
    /// answer. Message contents are plain text: only the template's markup becomes control tokens, so no
    /// user can forge a turn of another role ([`crate::Model::tokenize_chat`]).
    fn conversation_tokens(
        &self,
        record: &ManagerRecord,
        user_message: &str,
    ) -> Result<Vec<LlamaToken>> {
        let mut messages = Vec::with_capacity(record.history.len() + 2);
        if let Some(system) = &record.system_prompt {
            messages.push(ChatMessage {
                role: "system".to_owned(),
                content: system.clone(),
            });
        }
        messages.extend(record.history.iter().map(ChatMessage::from));
        messages.push(ChatMessage {
            role: "user".to_owned(),
            content: user_message.to_owned(),
        });
        self.model.tokenize_chat(&messages, true, true)
    }
}

/// A chat turn in progress (see [`SessionTurn::start_chat`]). It holds its session until it is finished or
/// dropped, so that turns of one session never interleave and the session is not evicted under it.
pub struct ChatTurn {
    permit: TurnPermit,
    user_message: String,
    generator: Generator,
    text: String,
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

    /// Ends the turn: the rest of the answer is generated if it was not read, the user message and the answer
    /// join the history, and the session is saved if the manager autosaves. The session is then the most
    /// recently used, and sessions over `max_live` that were kept for their turns are evicted.
    pub fn finish(mut self, manager: &SessionManager) -> Result<Generation> {
        while self.next_piece(&mut crate::NeverInterrupt)?.is_some() {}
        let ChatTurn {
            permit,
            user_message,
            generator,
            text,
        } = self;
        let session = Arc::clone(permit.session());
        let mut record = lock(&session.record);
        record.manager.history.push(StoredMessage {
            role: "user".to_owned(),
            content: user_message,
        });
        record.manager.history.push(StoredMessage {
            role: "assistant".to_owned(),
            content: text.clone(),
        });
        record.mark_changed();
        let stored = if manager.autosave {
            let context = lock(&session.context);
            manager.store_record(&session.id, &mut record, &context)
        } else {
            Ok(())
        };
        drop(record);
        let stored = manager.forget_if_conflict(&session, stored);
        drop(permit);
        manager.live.touch(&session);
        manager.evict_over_capacity();
        stored?;
        Ok(generator.into_generation(text))
    }

    /// The session this turn runs on.
    pub fn session_id(&self) -> &str {
        &self.permit.session().id
    }
}
