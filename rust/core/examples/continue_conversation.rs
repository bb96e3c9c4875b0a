//! Encodes a system prompt once, then asks two questions, each continuing where the context stands.
//!
//! cargo run --release --example continue_conversation -- path/to/model.gguf

use llama_sessions::{
    ChatMessage, Context, ContextParams, GenerateOptions, Model, ModelParams, NeverInterrupt,
    SamplingParams,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: continue_conversation MODEL.gguf")?;
    let model = Model::load(&path, &ModelParams::default())?;
    let mut ctx = Context::new(&model, ContextParams::default())?;
    let greedy = |max_tokens| GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
    };
    let turn = |role: &str, content: &str| {
        model.apply_chat_template(
            &[ChatMessage {
                role: role.into(),
                content: content.into(),
            }],
            role == "user",
        )
    };
    let system = turn(
        "system",
        "You answer questions about geography in a few words.",
    )?;
    ctx.generate(0, &system, greedy(0), &mut NeverInterrupt)?;
    println!("system prompt: {} tokens", ctx.token_count(0)?);
    for question in ["What is the capital of France?", "And of Italy?"] {
        // Each call continues after the previous answer, whose end-of-turn token is in the context.
        let answer = ctx.generate(
            0,
            &format!("\n{}", turn("user", question)?),
            greedy(24),
            &mut NeverInterrupt,
        )?;
        println!(
            "Q: {question}\nA: {} [{} tokens held]",
            answer.text,
            ctx.token_count(0)?
        );
    }
    Ok(())
}
