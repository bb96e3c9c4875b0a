//! Aggregate generation speed of 1, 2, 4 and 8 concurrent greedy turns (a 300-token prompt each, 64 tokens
//! to generate) through one Engine, against one Context per turn run one after the other.
//!
//! cargo run --release --example engine_throughput -- path/to/model.gguf [n_threads] [1,2,4,8]

use std::time::Instant;

use llama_sessions::{
    ChatMessage, Context, ContextParams, Engine, GenerateOptions, LlamaToken, Model, ModelParams,
    NeverInterrupt, SamplingParams,
};

const PROMPT_TOKENS: usize = 300;
const MAX_TOKENS: usize = 64;
const TOPICS: [&str; 8] = [
    "a lighthouse",
    "bread",
    "a city market",
    "steam engines",
    "the moon",
    "a river",
    "bees",
    "a library",
];

/// A chat asking for a long text on topic `i`, cut to [`PROMPT_TOKENS`] tokens of notes before the question.
fn prompt(model: &Model, i: usize) -> Result<Vec<LlamaToken>, llama_sessions::Error> {
    let mut notes = String::new();
    let mut n = 0;
    loop {
        let messages = [ChatMessage {
            role: "user".into(),
            content: format!(
                "{notes}Now write a long, detailed story about {}.",
                TOPICS[i]
            ),
        }];
        let tokens = model.tokenize_chat(&messages, true, true)?;
        if tokens.len() >= PROMPT_TOKENS {
            // Keep the question and the assistant's turn at the end: drop notes tokens from the start.
            let cut = tokens.len() - PROMPT_TOKENS;
            return Ok([&tokens[..1], &tokens[1 + cut..]].concat());
        }
        notes.push_str(&format!(
            "Note {n} on {}: item {} was seen {} times near the northern gate.\n",
            TOPICS[i],
            n * 3 + i,
            n * 7 + 2
        ));
        n += 1;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: engine_throughput MODEL.gguf [n_threads] [turn counts, e.g. 1,2,4,8]")?;
    let threads: u32 = args
        .next()
        .map_or(Ok(llama_sessions::default_threads()), |n| n.parse())?;
    let counts: Vec<usize> = match args.next() {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 2, 4, 8],
    };
    let model = Model::load(&path, &ModelParams::default())?;
    let greedy = GenerateOptions {
        max_tokens: MAX_TOKENS,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
    };
    let prompts = (0..8)
        .map(|i| prompt(&model, i))
        .collect::<Result<Vec<_>, _>>()?;
    println!(
        "Per run: generated tokens / wall seconds (prompts included), and the generation rate: tokens / seconds \
         from the moment every turn had its first token to the last token (engine), or spent generating (one \
         context per turn)."
    );
    println!("turns  engine: tokens  wall s  tok/s  gen tok/s   contexts: tokens  wall s  tok/s  gen tok/s");
    for n in counts {
        let params = ContextParams {
            n_ctx: 512 * n as u32,
            n_batch: 512,
            n_threads: threads,
            ..ContextParams::default()
        };
        let engine = Engine::new(&model, params, n as u32)?;
        let started = Instant::now();
        let turns = (0..n)
            .map(|i| engine.submit_tokens(i as u32, prompts[i].clone(), greedy.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        // Each turn's pieces with the time they arrived (one piece per token for this English text).
        let arrivals: Vec<Vec<Instant>> = std::thread::scope(|scope| {
            let readers: Vec<_> = turns
                .into_iter()
                .map(|turn| {
                    scope.spawn(move || {
                        turn.map(|piece| piece.map(|_| Instant::now()))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            readers
                .into_iter()
                .map(|r| r.join().expect("reader thread"))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let batched: usize = arrivals.iter().map(Vec::len).sum();
        // Generation proper: from the moment every turn has its first token (every prompt is read) to the
        // last token, counting the tokens that arrived in between.
        let all_reading_done = arrivals.iter().filter_map(|a| a.first()).max();
        let last = arrivals.iter().filter_map(|a| a.last()).max();
        let (generated_after, generation_window) = match (all_reading_done, last) {
            (Some(&from), Some(&to)) => (
                arrivals.iter().flatten().filter(|&&t| t > from).count(),
                (to - from).as_secs_f64(),
            ),
            _ => (0, 0.0),
        };
        let batched_seconds = started.elapsed().as_secs_f64();
        drop(engine);

        // Each context is created just before its turn and dropped after it, so that no idle context's
        // threads compete with the one at work; creating it is not timed.
        let mut alone = 0;
        let mut alone_seconds = 0.0;
        let mut alone_generating = 0.0;
        for tokens in &prompts[..n] {
            let mut ctx = Context::new(
                &model,
                ContextParams {
                    n_ctx: 512,
                    n_batch: 512,
                    n_threads: threads,
                    ..ContextParams::default()
                },
            )?;
            let started = Instant::now();
            let (mut generator, _) = ctx.start_generation_reusing_prefix_tokens(
                0,
                tokens,
                greedy.clone(),
                &mut NeverInterrupt,
            )?;
            while generator
                .next_piece(&mut ctx, &mut NeverInterrupt)?
                .is_some()
            {}
            alone += generator.tokens().len();
            alone_seconds += started.elapsed().as_secs_f64();
            alone_generating += generator.stats().generation_seconds;
        }
        println!(
            "{n:>5}  {batched:>14}  {batched_seconds:>6.2}  {:>5.1}  {:>9.1}   {alone:>16}  {alone_seconds:>6.2}  {:>5.1}  {:>9.1}",
            batched as f64 / batched_seconds,
            generated_after as f64 / generation_window,
            alone as f64 / alone_seconds,
            alone as f64 / alone_generating,
        );
    }
    Ok(())
}
