//! The translation between Ollama's and OpenAI's shapes, request by request and stream by stream.

use super::sse::SseParser;
use super::*;

fn events_of(reads: &[&str]) -> Vec<String> {
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    for read in reads {
        parser.feed(read.as_bytes(), &mut events).unwrap();
    }
    parser.finish(&mut events);
    events
}

#[test]
fn sse_events_split_across_reads_or_packed_into_one_come_out_whole() {
    let whole = "data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";
    let expected = vec!["{\"a\":1}".to_string(), "{\"b\":2}".into(), "[DONE]".into()];
    assert_eq!(events_of(&[whole]), expected);
    // Every split point, including inside "data:" and between the two newlines.
    for cut in 0..whole.len() {
        assert_eq!(events_of(&[&whole[..cut], &whole[cut..]]), expected, "cut at {cut}");
    }
    let bytes: Vec<String> = whole.chars().map(String::from).collect();
    let reads: Vec<&str> = bytes.iter().map(String::as_str).collect();
    assert_eq!(events_of(&reads), expected);
}

#[test]
fn sse_crlf_comments_multiline_data_and_an_unterminated_last_event() {
    assert_eq!(
        events_of(&[": keep-alive\r\n\r\nevent: x\r\ndata: one\r\ndata:two\r\n\r\ndata: {\"last\":true}"]),
        vec!["one\ntwo".to_string(), "{\"last\":true}".into()]
    );
}

#[test]
fn sse_multibyte_characters_split_across_reads_survive() {
    let text = "data: {\"c\":\"héllo ✓\"}\n\n";
    let bytes = text.as_bytes();
    for cut in 0..bytes.len() {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        parser.feed(&bytes[..cut], &mut events).unwrap();
        parser.feed(&bytes[cut..], &mut events).unwrap();
        assert_eq!(events, vec!["{\"c\":\"héllo ✓\"}".to_string()]);
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(object) => object,
        _ => panic!("not an object"),
    }
}

#[test]
fn a_chat_maps_messages_options_and_format() {
    let request = object(json!({
        "model": "llm",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "look", "images": ["aGk="]},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "content": "42", "tool_name": "f"},
        ],
        "options": {"temperature": 0.2, "top_p": 0.9, "num_predict": 64, "stop": ["\n\n"], "seed": 7, "num_ctx": 4096},
        "format": "json",
        "keep_alive": "5m",
    }));
    let (path, body) = completion_request(Endpoint::Chat, "llm", &request).unwrap();
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(body["stream"], true, "Ollama streams unless told not to");
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["messages"][1], json!({"role": "user", "content": "look"}));
    assert_eq!(body["messages"][2]["tool_calls"][0]["function"]["arguments"], "{\"x\":1}");
    assert_eq!(body["messages"][3]["name"], "f");
    assert_eq!(body["temperature"], 0.2);
    assert_eq!(body["top_p"], 0.9);
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["stop"], json!(["\n\n"]));
    assert_eq!(body["seed"], 7);
    assert_eq!(body["response_format"], json!({"type": "json_object"}));
    assert!(body.get("num_ctx").is_none() && body.get("keep_alive").is_none() && body.get("options").is_none());

    let request = object(json!({"model": "llm", "messages": [], "stream": false, "options": {"num_predict": -1}}));
    let (_, body) = completion_request(Endpoint::Chat, "llm", &request).unwrap();
    assert_eq!(body["stream"], false);
    assert!(body.get("stream_options").is_none() && body.get("max_tokens").is_none());
    assert!(completion_request(Endpoint::Chat, "llm", &object(json!({"messages": "hi"}))).is_err());
    assert!(body.get("chat_template_kwargs").is_none(), "without `think` the server's default stands");
}

#[test]
fn think_becomes_the_templates_arguments() {
    let chat =
        |think: Value| completion_request(Endpoint::Chat, "llm", &object(json!({"messages": [], "think": think})));
    let kwargs = |think: Value| chat(think).map(|(_, body)| body["chat_template_kwargs"].clone());
    assert_eq!(kwargs(json!(false)), Ok(json!({"enable_thinking": false})));
    assert_eq!(kwargs(json!(true)), Ok(json!({"enable_thinking": true})));
    assert_eq!(kwargs(json!("low")), Ok(json!({"enable_thinking": true, "reasoning_effort": "low"})));
    assert!(chat(json!("very")).is_err_and(|e| e.contains("`think`")));
    let generate = completion_request(Endpoint::Generate, "llm", &object(json!({"prompt": "hi", "think": false})));
    assert_eq!(generate.map(|(_, body)| body["chat_template_kwargs"].clone()), Ok(json!({"enable_thinking": false})));
}

#[test]
fn a_generate_is_a_chat_unless_raw() {
    let request = object(json!({"prompt": "why?", "system": "be brief", "format": {"type": "object"}}));
    let (path, body) = completion_request(Endpoint::Generate, "llm", &request).unwrap();
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}])
    );
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["schema"], json!({"type": "object"}));

    let request = object(json!({"prompt": "why?", "system": "be brief", "raw": true, "stream": false}));
    let (path, body) = completion_request(Endpoint::Generate, "llm", &request).unwrap();
    assert_eq!(path, "/v1/completions");
    assert_eq!(body["prompt"], "be brief\n\nwhy?");
    assert!(completion_request(Endpoint::Generate, "llm", &object(json!({"prompt": 3}))).is_err());
}

fn progress(endpoint: Endpoint) -> Progress {
    let request = Translation {
        endpoint,
        asked: "llm".into(),
        name: "llm".into(),
        started: Instant::now(),
        load_duration: Duration::ZERO,
    };
    Progress::new(request, Instant::now())
}

fn lines(out: &[u8]) -> Vec<Value> {
    std::str::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn streamed_chunks_become_lines_and_done_ends_them() {
    let mut progress = progress(Endpoint::Chat);
    let mut out = Vec::new();
    progress
        .event(
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}"#,
            &mut out,
        )
        .unwrap();
    progress.event(r#"{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"length"}]}"#, &mut out).unwrap();
    progress.event(r#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#, &mut out).unwrap();
    progress.event("[DONE]", &mut out).unwrap();
    progress.event("[DONE]", &mut out).unwrap();
    let lines = lines(&out);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["message"], json!({"role": "assistant", "content": "Hel"}));
    assert_eq!(lines[0]["done"], false);
    assert_eq!(lines[1]["message"]["content"], "lo");
    let last = &lines[2];
    assert_eq!((last["done"].clone(), last["done_reason"].clone()), (json!(true), json!("length")));
    assert_eq!((last["prompt_eval_count"].clone(), last["eval_count"].clone()), (json!(4), json!(2)));
    assert_eq!(last["model"], "llm");
    assert!(last["total_duration"].is_u64() && last["eval_duration"].is_u64());
    assert!(chrono::DateTime::parse_from_rfc3339(last["created_at"].as_str().unwrap()).is_ok());
}

#[test]
fn streamed_tool_calls_are_assembled_and_completions_text_is_read() {
    let mut progress = progress(Endpoint::Chat);
    let mut out = Vec::new();
    let first = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"get","arguments":"{\"ci"}}]}}]}"#;
    let second = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Oslo\"}"}}]},"finish_reason":"tool_calls"}]}"#;
    progress.event(first, &mut out).unwrap();
    progress.event(second, &mut out).unwrap();
    progress.event("[DONE]", &mut out).unwrap();
    let lines = lines(&out);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]["message"]["tool_calls"],
        json!([{"function": {"name": "get", "arguments": {"city": "Oslo"}}}])
    );
    assert_eq!(lines[1]["done_reason"], "stop");

    let mut progress = self::progress(Endpoint::Generate);
    let mut out = Vec::new();
    progress.event(r#"{"choices":[{"text":"abc","finish_reason":null}]}"#, &mut out).unwrap();
    assert_eq!(self::lines(&out)[0]["response"], "abc");
    assert!(progress.event(r#"{"error":{"message":"context full"}}"#, &mut out).unwrap_err().contains("context full"));
}

#[test]
fn tool_calls_are_bounded_in_all_not_only_one_by_one() {
    let mut progress = progress(Endpoint::Chat);
    let mut out = Vec::new();
    // Each call 1 MiB, each a new one: under the bound one by one, over it together.
    let arguments = "x".repeat(1 << 20);
    let mut refused = None;
    for index in 0..=(MAX_EVENT_BYTES >> 20) {
        let chunk =
            json!({"choices": [{"delta": {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}}]});
        if let Err(message) = progress.event(&chunk.to_string(), &mut out) {
            refused = Some((index, message));
            break;
        }
    }
    let (index, message) = refused.expect("17 MiB of tool calls must be refused");
    assert_eq!(index, MAX_EVENT_BYTES >> 20, "refused at the call that went over");
    assert!(message.contains("in all"), "{message}");
}

#[test]
fn a_whole_answer_becomes_one_object() {
    let mut progress = progress(Endpoint::Chat);
    let answer = json!({
        "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    });
    let whole = progress.whole(&answer);
    assert_eq!(whole["message"], json!({"role": "assistant", "content": "hi"}));
    assert_eq!((whole["done"].clone(), whole["done_reason"].clone()), (json!(true), json!("stop")));
    assert_eq!((whole["prompt_eval_count"].clone(), whole["eval_count"].clone()), (json!(3), json!(1)));
}

#[test]
fn a_tool_call_cut_off_mid_arguments_goes_with_the_content() {
    // A whole answer: the call's arguments end mid-object (the token limit), another is whole.
    let mut progress = progress(Endpoint::Chat);
    let answer = json!({
        "choices": [{"message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get", "arguments": "{\"city\": \"Os"}},
            {"function": {"name": "now", "arguments": ""}},
        ]}, "finish_reason": "length"}],
    });
    let whole = progress.whole(&answer);
    assert_eq!(whole["message"]["tool_calls"], json!([{"function": {"name": "now", "arguments": {}}}]));
    assert_eq!(whole["message"]["content"], "{\"name\": \"get\", \"arguments\": {\"city\": \"Os}");

    // Streamed: the same.
    let mut progress = self::progress(Endpoint::Chat);
    let mut out = Vec::new();
    let chunk = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"get","arguments":"{"}}]}}]}"#;
    progress.event(chunk, &mut out).unwrap();
    progress.event("[DONE]", &mut out).unwrap();
    let lines = lines(&out);
    assert!(lines[0]["message"].get("tool_calls").is_none(), "{lines:?}");
    assert_eq!(lines[0]["message"]["content"], "{\"name\": \"get\", \"arguments\": {}");
}
