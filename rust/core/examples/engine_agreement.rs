//! How often a chat decoded under batching (8 turns at once through one Engine) produces exactly the tokens
//! it produces alone (the same sequence of a Context with the engine's parameters, nothing else decoded),
//! for greedy and for seeded sampling. Batching changes the kernels' accumulation order, so logits can
//! differ in their last bits, and a near tie can then go the other way.
//!
//! cargo run --release --example engine_agreement -- path/to/model.gguf [max_tokens]

use llama_sessions::{
    ChatMessage, Context, ContextParams, Engine, GenerateOptions, Model, ModelParams,
    NeverInterrupt, SamplingParams,
};

const QUESTIONS: [&str; 16] = [
    "Tell me a story about a dragon and a lighthouse.",
    "Write a short essay about the history of bread.",
    "Describe a walk through a busy city market.",
    "Explain how a steam engine works.",
    "What should I pack for a week of hiking in the mountains?",
    "Give me a recipe for a vegetable soup.",
    "Why is the sky blue? Explain it to a child.",
    "Write a poem about the sea at night.",
    "How do bees make honey?",
    "Describe the planets of the solar system.",
    "What are good habits for learning a new language?",
    "Tell me about the invention of the printing press.",
    "Write a letter to a friend who moved abroad.",
    "How does a bicycle stay upright?",
    "Describe a winter morning in a small village.",
    "What makes a good cup of coffee?",
];

/// The sampling of the chat on sequence `seq`.
type SamplingFor = fn(u32) -> SamplingParams;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: engine_agreement MODEL.gguf [max_tokens]")?;
    let max_tokens: usize = args.next().map_or(Ok(64), |n| n.parse())?;
    let model = Model::load(&path, &ModelParams::default())?;
    let live = 8u32;
    let params = ContextParams {
        n_ctx: 512 * live,
        n_batch: 512,
        ..ContextParams::default()
    };
    let modes: [(&str, SamplingFor); 2] = [
        ("greedy", |_| SamplingParams::greedy()),
        ("seeded (temperature 0.8)", |seed| SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        }),
    ];
    for (name, sampling) in modes {
        let mut agree = 0;
        let mut diverged = Vec::new();
        for round in QUESTIONS.chunks(live as usize) {
            let chats = round
                .iter()
                .map(|q| {
                    model.tokenize_chat(
                        &[ChatMessage {
                            role: "user".into(),
                            content: (*q).into(),
                        }],
                        true,
                        true,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let options = |seq: u32| GenerateOptions {
                max_tokens,
                sampling: sampling(seq),
                stop: Vec::new(),
            };
            let engine = Engine::new(&model, params.clone(), live)?;
            let turns = chats
                .iter()
                .enumerate()
                .map(|(seq, chat)| {
                    engine.submit_tokens(seq as u32, chat.clone(), options(seq as u32))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let batched = turns
                .into_iter()
                .map(|turn| turn.finish().map(|g| g.tokens))
                .collect::<Result<Vec<_>, _>>()?;
            let mut solo = Context::new(&model, engine.params().clone())?;
            for (seq, chat) in chats.iter().enumerate() {
                let seq = seq as u32;
                let (mut generator, _) = solo.start_generation_reusing_prefix_tokens(
                    seq,
                    chat,
                    options(seq),
                    &mut NeverInterrupt,
                )?;
                while generator
                    .next_piece(&mut solo, &mut NeverInterrupt)?
                    .is_some()
                {}
                let alone = generator.tokens();
                if alone == batched[seq as usize].as_slice() {
                    agree += 1;
                } else {
                    let first = alone
                        .iter()
                        .zip(&batched[seq as usize])
                        .take_while(|(a, b)| a == b)
                        .count();
                    diverged.push(first);
                }
            }
        }
        println!(
            "{name}: {agree} of {} chats ({max_tokens} tokens each, {live} at once) agree with their solo \
             runs; the others diverge at token {diverged:?}",
            QUESTIONS.len()
        );
    }
    Ok(())
}
