//! Parsing a model's raw output into validated actions, one agent at a time.
//!
//! A model's bad output is data, not an error: [`parse`] never panics and never fails; it returns
//! a [`ParseResult`] holding the operations that validated and a [`Rejection`] (stable code +
//! human message) for everything that did not.
//!
//! # What is tolerated
//!
//! The pipeline, in order (each step is simple enough to be mirrored by a short Python reference,
//! which the test-suite compares against this implementation):
//!
//! 1. **Size**: more than [`MAX_INPUT_BYTES`] bytes of UTF-8 -> `too_large`; only whitespace ->
//!    `empty_output`.
//! 2. **Reasoning blocks**: leading `<think>…</think>` / `<thinking>…</thinking>` blocks (ASCII
//!    case-insensitive; whitespace around them allowed) are removed; a leading block that never
//!    closes leaves nothing (the model was cut off while thinking). When there is no leading block,
//!    the first closing tag (the chat template opened the block in the prompt) drops everything up to
//!    and including it — unless the text after it yields no value that looks like an answer (steps
//!    3-5) while the whole text does: then the tag was inside the JSON and the whole text is used. Tags anywhere else are
//!    left alone, so that a memory that mentions `<think>` is not mangled.
//! 3. **A bare JSON scalar** (the whole text is e.g. a JSON string holding the real JSON) ->
//!    `wrong_shape`: we never parse JSON inside a string.
//! 4. **Finding the JSON**: prose, code fences and anything else around the JSON are skipped. Every
//!    `{` or `[` starts a candidate; its extent is found by a string-aware bracket scan (which also
//!    rejects nesting deeper than [`MAX_DEPTH`] *before* serde recurses, with `too_deep`). Trailing
//!    commas are removed (outside strings) and the span is parsed with serde_json. A candidate that
//!    parses is skipped over as a whole; one that does not is "JSON-looking" when it starts with `{`
//!    followed by `"` or `}`, or `[` followed by `{`, `[`, `"` or `]` (whitespace allowed between):
//!    such a span counts as `invalid_json` evidence and is skipped as a whole, any other is prose and
//!    the scan moves on by one character. A JSON-looking candidate that never closes means the output
//!    was cut off: `truncated_json`, and the scan stops. At most [`MAX_CANDIDATES`] starts are tried.
//! 5. **Choosing**: a parsed value "looks like an answer" when it is an object with an operation
//!    key, an operations key or an agent-name key, or a list that is empty or starts with an
//!    object, a list or an operation name. Two answers -> `multiple_json`; one answer plus a cut-off
//!    JSON-looking tail -> `truncated_json`; one answer -> used; none -> `truncated_json`, else
//!    `invalid_json`, else the first parsed value (which then fails the shape check), else `no_json`.
//! 6. **Shape**: an object keyed by this agent's name (`{"episodic": {...}}`) is unwrapped once (an
//!    object keyed only by another agent's name is `wrong_shape`). Then: an object with an
//!    operations key holds a list of operations (or one operation object); an object with an
//!    operation key is a single operation (the core agent's usual form); a list is a list of
//!    operations, unless its first element is a string, in which case the list is one compact
//!    operation (`["ADD", "text"]`). Anything else: `missing_operations` (object) or `wrong_shape`.
//!    More than [`MAX_OPERATIONS`] operations -> `too_large`. An empty list is valid: nothing to do.
//! 7. **Each operation** is validated on its own (its rejection carries its index; valid siblings
//!    are kept). Action names are case-insensitive and surrounding whitespace is ignored.
//!
//! # Operations per agent
//!
//! | agent      | allowed                                   |
//! |------------|-------------------------------------------|
//! | core       | APPEND, REPLACE, REWRITE (and SKIP)       |
//! | episodic   | ADD, UPDATE, MERGE                        |
//! | semantic   | ADD, UPDATE, SKIP                         |
//! | procedural | ADD, UPDATE                               |
//!
//! # Keys and their aliases
//!
//! Keys are matched ASCII case-insensitively, with `-` and spaces read as `_`. For each field the
//! first alias (in the order below) that is present with a non-null value is used; if two raw keys
//! normalise to the same alias, the lexicographically smallest raw key wins.
//!
//! - operation name: `operation`, `action`, `op`
//! - list of operations: `operations`, `actions`, `ops`
//! - APPEND / REWRITE content: `content`, `text`, `memory`, `new_content`
//! - REPLACE old: `old_text`, `old`, `old_content`, `old_memory`; new: `new_text`, `new`,
//!   `new_content`, `content`, `new_memory`
//! - ADD memory: `memory`, `content`, `text`, `new_memory`
//! - UPDATE old: `old_memory`, `old`, `old_text`; new (UPDATE and MERGE): `new_memory`, `new`,
//!   `new_text`, `memory`, `content`
//! - MERGE olds: `old_memories`, `olds`, `old_memory`, `old`, `old_texts` (a list of strings, or one
//!   string)
//! - SKIP reason (optional): `reason`
//!
//! Compact list forms: `["APPEND", text]`, `["REWRITE", text]`, `["REPLACE", old, new]`,
//! `["ADD", text]`, `["UPDATE", old, new]`, `["MERGE", [olds] | old, new]`, `["SKIP"]`,
//! `["SKIP", reason]`.
//!
//! # Field values
//!
//! Text fields must be strings (`null` or absent -> `missing_field`, other types -> `wrong_type`);
//! they are trimmed, and must then be non-empty (`empty_field`) and at most [`MAX_TEXT_CHARS`]
//! Unicode scalar values (`text_too_long`). Unknown extra keys are ignored.

use serde_json::{Map, Value};

use crate::kinds::{Action, Agent, Op};

/// The JSON value type of [`action_to_value`], re-exported so that the binding needs no direct
/// serde_json dependency.
pub use serde_json::Value as JsonValue;

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

/// Largest raw output accepted, in bytes of UTF-8 (a 6,000-token response is ~24 KB).
pub const MAX_INPUT_BYTES: usize = 512 * 1024;
/// Deepest bracket nesting accepted. Valid outputs need 5; serde_json's own limit is 128, and we
/// check ours by scanning before serde sees the text, so serde never reaches its limit.
pub const MAX_DEPTH: usize = 64;
/// Longest text accepted in one field, in Unicode scalar values (the core block's limit is 5,000).
pub const MAX_TEXT_CHARS: usize = 16_384;
/// Most operations accepted in one output.
pub const MAX_OPERATIONS: usize = 1_024;
/// Most candidate JSON starts tried in one output (bounds the work on bracket-heavy prose).
pub const MAX_CANDIDATES: usize = 64;

// ---------------------------------------------------------------------------------------------
// Rejection codes (stable; mirrored in the Python stub's `Rejection` docstring)
// ---------------------------------------------------------------------------------------------

pub mod codes {
    pub const EMPTY_OUTPUT: &str = "empty_output";
    pub const NO_JSON: &str = "no_json";
    pub const INVALID_JSON: &str = "invalid_json";
    pub const TRUNCATED_JSON: &str = "truncated_json";
    pub const MULTIPLE_JSON: &str = "multiple_json";
    pub const TOO_DEEP: &str = "too_deep";
    pub const TOO_LARGE: &str = "too_large";
    pub const WRONG_SHAPE: &str = "wrong_shape";
    pub const MISSING_OPERATIONS: &str = "missing_operations";
    pub const UNKNOWN_ACTION: &str = "unknown_action";
    pub const ACTION_NOT_ALLOWED: &str = "action_not_allowed";
    pub const MISSING_FIELD: &str = "missing_field";
    pub const WRONG_TYPE: &str = "wrong_type";
    pub const EMPTY_FIELD: &str = "empty_field";
    pub const TEXT_TOO_LONG: &str = "text_too_long";

    /// Every code, for documentation and tests.
    pub const ALL: [&str; 15] = [
        EMPTY_OUTPUT,
        NO_JSON,
        INVALID_JSON,
        TRUNCATED_JSON,
        MULTIPLE_JSON,
        TOO_DEEP,
        TOO_LARGE,
        WRONG_SHAPE,
        MISSING_OPERATIONS,
        UNKNOWN_ACTION,
        ACTION_NOT_ALLOWED,
        MISSING_FIELD,
        WRONG_TYPE,
        EMPTY_FIELD,
        TEXT_TOO_LONG,
    ];
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// Why (part of) an output was refused; `code` is stable and machine-readable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
    /// The operation's position, or `None` when the whole output was refused.
    pub index: Option<usize>,
}

impl Rejection {
    #[cold]
    fn whole(code: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            index: None,
        }
    }

    #[cold]
    fn at(index: usize, code: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            index: Some(index),
        }
    }
}

/// The outcome of parsing one agent's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseResult {
    pub agent: Agent,
    pub actions: Vec<Action>,
    pub rejections: Vec<Rejection>,
    /// Characters of new content (core: content/new_text; banks: memory/new_memory summed).
    pub content_chars: usize,
}

impl ParseResult {
    /// The format gate: parsed, and no operation rejected.
    pub fn ok(&self) -> bool {
        self.rejections.is_empty()
    }

    fn refused(agent: Agent, rejection: Rejection) -> Self {
        ParseResult {
            agent,
            actions: Vec::new(),
            rejections: vec![rejection],
            content_chars: 0,
        }
    }

    /// The new content of the valid actions joined with newlines (what the length penalty
    /// measures, for callers that count tokens with a real tokenizer).
    pub fn content_text(&self) -> String {
        let parts: Vec<&str> = self
            .actions
            .iter()
            .filter_map(|a| a.text.as_deref())
            .collect();
        parts.join("\n")
    }

    /// `reward::approx_tokens(&self.content_text())` without building the text: its characters
    /// are the content characters plus one newline between consecutive texts.
    pub fn content_approx_tokens(&self) -> usize {
        let texts = self.actions.iter().filter(|a| a.text.is_some()).count();
        (self.content_chars + texts.saturating_sub(1)) / 4
    }

    /// Canonical JSON of the valid actions: `{"operations": [...]}` with each action in the shape
    /// the prompts ask for, keys sorted, no insignificant whitespace.
    pub fn to_json(&self) -> String {
        actions_to_json(&self.actions)
    }
}

/// Characters of new content in `actions`: the `text` of every action (APPEND/REWRITE content,
/// REPLACE new_text, ADD memory, UPDATE/MERGE new_memory), in Unicode scalar values.
pub fn content_chars(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter_map(|a| a.text.as_deref())
        .map(|t| t.chars().count())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Canonical serialisation
// ---------------------------------------------------------------------------------------------

/// One action as the canonical JSON object the prompts ask for (core actions use `operation`,
/// bank actions use `action`).
pub fn action_to_value(action: &Action) -> Value {
    let mut m = Map::new();
    let is_core = action.agent == Agent::Core;
    let op_key = if is_core { "operation" } else { "action" };
    m.insert(
        op_key.to_string(),
        Value::String(action.op.as_str().to_string()),
    );
    let text = action.text.clone().map(Value::String);
    let first_old = action.old.first().cloned().map(Value::String);
    match (is_core, action.op) {
        (true, Op::Append) | (true, Op::Rewrite) => {
            if let Some(t) = text {
                m.insert("content".into(), t);
            }
        }
        (true, Op::Replace) => {
            if let Some(o) = first_old {
                m.insert("old_text".into(), o);
            }
            if let Some(t) = text {
                m.insert("new_text".into(), t);
            }
        }
        (false, Op::Add) => {
            if let Some(t) = text {
                m.insert("memory".into(), t);
            }
        }
        (false, Op::Update) => {
            if let Some(o) = first_old {
                m.insert("old_memory".into(), o);
            }
            if let Some(t) = text {
                m.insert("new_memory".into(), t);
            }
        }
        (false, Op::Merge) => {
            let olds = action.old.iter().cloned().map(Value::String).collect();
            m.insert("old_memories".into(), Value::Array(olds));
            if let Some(t) = text {
                m.insert("new_memory".into(), t);
            }
        }
        _ => {
            // SKIP, and any op/agent pairing the validator would refuse: keep what is there.
            if let Some(t) = text {
                m.insert("text".into(), t);
            }
            if !action.old.is_empty() {
                let olds = action.old.iter().cloned().map(Value::String).collect();
                m.insert("old".into(), Value::Array(olds));
            }
        }
    }
    if let Some(r) = &action.reason {
        m.insert("reason".into(), Value::String(r.clone()));
    }
    Value::Object(sorted(m))
}

/// Canonical JSON of a list of actions: `{"operations":[...]}`, keys sorted, compact.
pub fn actions_to_json(actions: &[Action]) -> String {
    let ops: Vec<Value> = actions.iter().map(action_to_value).collect();
    let mut top = Map::new();
    top.insert("operations".to_string(), Value::Array(ops));
    // Serialising a Value of strings and maps cannot fail.
    serde_json::to_string(&Value::Object(top)).unwrap_or_default()
}

/// Rebuild a map with its keys in sorted order, whatever map type serde_json was built with.
fn sorted(m: Map<String, Value>) -> Map<String, Value> {
    let mut entries: Vec<(String, Value)> = m.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Parse and validate one agent's raw output. Never panics, never fails.
pub fn parse(agent: Agent, raw: &str) -> ParseResult {
    match extract(agent, raw) {
        Err(rejection) => ParseResult::refused(agent, rejection),
        Ok(value) => match operations_of(agent, &value) {
            Err(rejection) => ParseResult::refused(agent, rejection),
            Ok(ops) => {
                let mut actions = Vec::with_capacity(ops.len());
                let mut rejections = Vec::new();
                for (i, op) in ops.iter().enumerate() {
                    match validate_operation(agent, i, op) {
                        Ok(a) => actions.push(a),
                        Err(r) => rejections.push(r),
                    }
                }
                let content_chars = content_chars(&actions);
                ParseResult {
                    agent,
                    actions,
                    rejections,
                    content_chars,
                }
            }
        },
    }
}

/// Parse many outputs in parallel (through [`crate::par`], so a forked child parses on its own
/// thread instead of waiting on a pool it does not have); results are in input order.
pub fn parse_batch(items: &[(Agent, &str)]) -> Vec<ParseResult> {
    crate::par::map_indices_min(items.len(), 8, |i| parse(items[i].0, items[i].1))
}

/// Check an action built directly (not parsed): the same rules as for parsed operations, and no
/// field that its operation does not use. Returns the normalised (trimmed) action.
pub fn validate_action(action: &Action) -> Result<Action, Rejection> {
    let (uses_old, uses_text, uses_reason) = match action.op {
        Op::Append | Op::Rewrite | Op::Add => (false, true, false),
        Op::Replace | Op::Update | Op::Merge => (true, true, false),
        Op::Skip => (false, false, true),
    };
    let op = action.op.as_str();
    if !uses_old && !action.old.is_empty() {
        return Err(Rejection::at(
            0,
            codes::WRONG_SHAPE,
            format!("{op} takes no old texts; leave `old` empty"),
        ));
    }
    if !uses_text && action.text.is_some() {
        return Err(Rejection::at(
            0,
            codes::WRONG_SHAPE,
            format!("{op} takes no new text; leave `text` as None"),
        ));
    }
    if !uses_reason && action.reason.is_some() {
        return Err(Rejection::at(
            0,
            codes::WRONG_SHAPE,
            format!("only SKIP takes a reason, not {op}"),
        ));
    }
    if matches!(action.op, Op::Replace | Op::Update) && action.old.len() > 1 {
        return Err(Rejection::at(
            0,
            codes::WRONG_SHAPE,
            format!(
                "{op} names exactly one old text, got {}; use MERGE to combine several",
                action.old.len()
            ),
        ));
    }
    validate_operation(action.agent, 0, &action_to_value(action))
}

// ---------------------------------------------------------------------------------------------
// Step 1-5: from raw text to one JSON value
// ---------------------------------------------------------------------------------------------

fn extract(agent: Agent, raw: &str) -> Result<Value, Rejection> {
    let _ = agent;
    if raw.len() > MAX_INPUT_BYTES {
        return Err(Rejection::whole(
            codes::TOO_LARGE,
            format!(
                "output is {} bytes; at most {} are accepted",
                raw.len(),
                MAX_INPUT_BYTES
            ),
        ));
    }
    if raw.trim().is_empty() {
        return Err(Rejection::whole(
            codes::EMPTY_OUTPUT,
            "output is empty; expected a JSON object with the operations",
        ));
    }
    let (text, whole) = strip_reasoning(raw);
    let first = answer_of(text.trim());
    let chosen = match (&first, whole) {
        (Ok((_, true)), _) | (_, None) => first,
        (_, Some(whole)) => match answer_of(whole.trim()) {
            Ok((v, true)) => Ok((v, true)),
            _ => first,
        },
    };
    chosen.map(|(v, _)| v)
}

/// Steps 3-5 on the text left after step 2: the value, and whether it looks like an answer.
fn answer_of(text: &str) -> Result<(Value, bool), Rejection> {
    if text.is_empty() {
        return Err(Rejection::whole(
            codes::NO_JSON,
            "output holds only a reasoning block; expected the JSON operations after it",
        ));
    }
    if let Some(rejection) = scalar_check(text) {
        return Err(rejection);
    }
    find_answer(text)
}

/// Remove reasoning blocks (see the module docs, step 2). Returns the text to parse and, when a
/// stray closing tag was cut at, the whole text as a fallback.
pub fn strip_reasoning(s: &str) -> (&str, Option<&str>) {
    let mut rest = s;
    let mut stripped = false;
    loop {
        let t = rest.trim_start();
        match tag_at(t.as_bytes(), 0) {
            Some(tag) if !tag.closing => match find_close(t, tag.len, tag.thinking) {
                Some(end) => {
                    rest = &t[end..];
                    stripped = true;
                }
                None => return ("", None),
            },
            _ => break,
        }
    }
    if !stripped {
        let mut from = 0;
        while let Some((at, tag)) = next_tag(rest, from) {
            if tag.closing {
                return (&rest[at + tag.len..], Some(rest));
            }
            from = at + 1;
        }
    }
    (rest, None)
}

#[derive(Clone, Copy)]
struct Tag {
    closing: bool,
    thinking: bool,
    len: usize,
}

fn tag_at(b: &[u8], i: usize) -> Option<Tag> {
    if b.get(i) != Some(&b'<') {
        return None;
    }
    let mut j = i + 1;
    let closing = b.get(j) == Some(&b'/');
    if closing {
        j += 1;
    }
    if !starts_with_ci(b, j, b"think") {
        return None;
    }
    j += 5;
    let thinking = starts_with_ci(b, j, b"ing");
    if thinking {
        j += 3;
    }
    if b.get(j) != Some(&b'>') {
        return None;
    }
    Some(Tag {
        closing,
        thinking,
        len: j + 1 - i,
    })
}

fn starts_with_ci(b: &[u8], at: usize, pat: &[u8]) -> bool {
    b.len() >= at + pat.len() && b[at..at + pat.len()].eq_ignore_ascii_case(pat)
}

/// The next reasoning tag at or after byte `from` (a char boundary). `str::find` with an ASCII
/// char is a memchr, which keeps this pass cheap on long outputs without tags.
fn next_tag(s: &str, from: usize) -> Option<(usize, Tag)> {
    let b = s.as_bytes();
    let mut i = from;
    while let Some(off) = s[i..].find('<') {
        let at = i + off;
        if let Some(t) = tag_at(b, at) {
            return Some((at, t));
        }
        i = at + 1;
    }
    None
}

/// Position just after the first closing tag of the given name at or after `from`.
fn find_close(s: &str, from: usize, thinking: bool) -> Option<usize> {
    let mut i = from;
    while let Some((at, t)) = next_tag(s, i) {
        if t.closing && t.thinking == thinking {
            return Some(at + t.len);
        }
        i = at + 1;
    }
    None
}

/// Step 3: a text that is entirely one JSON scalar (most often a string holding JSON).
fn scalar_check(text: &str) -> Option<Rejection> {
    let first = text.as_bytes()[0];
    if !(first == b'"'
        || first == b'-'
        || first.is_ascii_digit()
        || matches!(first, b't' | b'f' | b'n'))
    {
        return None;
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::String(s)) => {
            let hint = if s.contains('{') || s.contains('[') {
                "the JSON is a string that holds JSON; emit the object itself, not a quoted string"
            } else {
                "the JSON is a bare string; expected an object with the operations"
            };
            Some(Rejection::whole(codes::WRONG_SHAPE, hint))
        }
        Ok(v) => Some(Rejection::whole(
            codes::WRONG_SHAPE,
            format!(
                "the JSON is a bare {}; expected an object with the operations",
                type_name(&v)
            ),
        )),
        Err(_) => None,
    }
}

enum Span {
    /// A span whose brackets balance: its exclusive end (or the first mismatched closer's, which
    /// makes it fail to parse), and whether a comma stands right before a closer in it.
    Closed {
        end: usize,
        trailing_comma: bool,
    },
    Open,
    TooDeep,
}

/// String-aware bracket scan from an opening `{` or `[` at `start`.
fn scan_span(b: &[u8], start: usize) -> Span {
    let mut stack: Vec<u8> = Vec::with_capacity(8);
    // The last byte outside strings that is not JSON whitespace (`"` for a string).
    let mut last = 0u8;
    let mut trailing_comma = false;
    let mut i = start;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' => {
                // Jump over the string, honouring escapes.
                let mut j = i + 1;
                loop {
                    match find_either(&b[j..], b'"', b'\\') {
                        None => return Span::Open,
                        Some(off) if b[j + off] == b'\\' => {
                            j += off + 2;
                            if j > b.len() {
                                return Span::Open;
                            }
                        }
                        Some(off) => {
                            i = j + off;
                            break;
                        }
                    }
                }
                last = b'"';
            }
            b'{' | b'[' => {
                stack.push(if c == b'{' { b'}' } else { b']' });
                if stack.len() > MAX_DEPTH {
                    return Span::TooDeep;
                }
                last = c;
            }
            b'}' | b']' => {
                trailing_comma |= last == b',';
                last = c;
                match stack.pop() {
                    Some(expected) if expected == c => {
                        if stack.is_empty() {
                            return Span::Closed {
                                end: i + 1,
                                trailing_comma,
                            };
                        }
                    }
                    // A mismatched closer: the span is malformed; end it here so that it fails to
                    // parse and is reported as invalid.
                    _ => {
                        return Span::Closed {
                            end: i + 1,
                            trailing_comma,
                        }
                    }
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => last = c,
        }
        i += 1;
    }
    Span::Open
}

/// Index of the first byte of `b` equal to `x` or `y`: `b.iter().position(..)`, eight bytes at
/// a time (most of a model's output is string contents and prose, which the bracket scan skips
/// with this).
#[inline]
fn find_either(b: &[u8], x: u8, y: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // A byte of `w ^ pattern` is zero where `w` holds the byte. `(v - LO) & !v & HI` flags such
    // bytes; a borrow can also flag a byte above a true zero, never one below, so the lowest
    // flag (little-endian order = first in memory) is exact.
    let (px, py) = (LO * x as u64, LO * y as u64);
    let mut i = 0;
    while i + 8 <= b.len() {
        let w = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let (vx, vy) = (w ^ px, w ^ py);
        let m = ((vx.wrapping_sub(LO) & !vx) | (vy.wrapping_sub(LO) & !vy)) & HI;
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    b[i..].iter().position(|&c| c == x || c == y).map(|o| i + o)
}

fn next_non_ws(b: &[u8], from: usize) -> Option<u8> {
    b[from.min(b.len())..]
        .iter()
        .copied()
        .find(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
}

/// Whether an opener at `start` looks like the start of JSON rather than a bracket in prose.
fn json_looking(b: &[u8], start: usize) -> bool {
    let next = next_non_ws(b, start + 1);
    match b[start] {
        b'{' => matches!(next, Some(b'"') | Some(b'}')),
        _ => matches!(next, Some(b'{') | Some(b'[') | Some(b'"') | Some(b']')),
    }
}

/// Remove commas that are followed (after whitespace) by `}` or `]`, outside strings.
pub fn remove_trailing_commas(s: &str) -> std::borrow::Cow<'_, str> {
    let b = s.as_bytes();
    let mut keep = vec![true; b.len()];
    let mut in_string = false;
    let mut escaped = false;
    for i in 0..b.len() {
        let c = b[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' {
            in_string = true;
        } else if c == b',' && matches!(next_non_ws(b, i + 1), Some(b'}') | Some(b']')) {
            keep[i] = false;
        }
    }
    if keep.iter().all(|k| *k) {
        return std::borrow::Cow::Borrowed(s);
    }
    // Only ASCII commas are dropped, so the result is still valid UTF-8.
    let bytes: Vec<u8> = b
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(c, _)| *c)
        .collect();
    std::borrow::Cow::Owned(String::from_utf8(bytes).unwrap_or_else(|_| s.to_string()))
}

const OP_KEYS: [&str; 3] = ["operation", "action", "op"];
const OPS_KEYS: [&str; 3] = ["operations", "actions", "ops"];

/// Whether raw key `k` normalises (ASCII lowercase, `-` and space read as `_`) to `alias`, an
/// already normalised ASCII name. Compared byte by byte: no allocation per key.
fn key_is(k: &str, alias: &str) -> bool {
    k.len() == alias.len()
        && k.bytes().zip(alias.bytes()).all(|(c, a)| {
            let c = match c {
                b'-' | b' ' => b'_',
                c => c.to_ascii_lowercase(),
            };
            c == a
        })
}

fn has_any_key(m: &Map<String, Value>, aliases: &[&str]) -> bool {
    m.keys().any(|k| aliases.iter().any(|a| key_is(k, a)))
}

fn agent_key(m: &Map<String, Value>) -> bool {
    m.keys()
        .any(|k| Agent::ALL.iter().any(|a| key_is(k, a.as_str())))
}

fn looks_like_answer(v: &Value) -> bool {
    match v {
        Value::Object(m) => has_any_key(m, &OP_KEYS) || has_any_key(m, &OPS_KEYS) || agent_key(m),
        Value::Array(items) => match items.first() {
            None => true,
            Some(Value::Object(_)) | Some(Value::Array(_)) => true,
            Some(Value::String(s)) => Op::parse(s).is_some(),
            Some(_) => false,
        },
        _ => false,
    }
}

/// Steps 4 and 5: find the one JSON value that is the answer (and say whether it looks like one).
fn find_answer(text: &str) -> Result<(Value, bool), Rejection> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut tried = 0;
    let mut parsed: Vec<Value> = Vec::new();
    let mut answers = 0usize;
    let mut answer: Option<Value> = None;
    let mut invalid: Option<String> = None;
    let mut truncated = false;
    while i < b.len() {
        let Some(off) = find_either(&b[i..], b'{', b'[') else {
            break;
        };
        let start = i + off;
        if tried == MAX_CANDIDATES {
            break;
        }
        tried += 1;
        match scan_span(b, start) {
            Span::TooDeep => {
                return Err(Rejection::whole(
                    codes::TOO_DEEP,
                    format!("JSON nests deeper than {MAX_DEPTH} levels; operations need at most 5"),
                ))
            }
            Span::Open => {
                if json_looking(b, start) {
                    truncated = true;
                    break;
                }
                i = start + 1;
            }
            Span::Closed {
                end,
                trailing_comma,
            } => {
                let span = if trailing_comma {
                    remove_trailing_commas(&text[start..end])
                } else {
                    std::borrow::Cow::Borrowed(&text[start..end])
                };
                match serde_json::from_str::<Value>(&span) {
                    Ok(v) => {
                        if looks_like_answer(&v) {
                            answers += 1;
                            if answer.is_none() {
                                answer = Some(v);
                            }
                        } else {
                            parsed.push(v);
                        }
                        i = end;
                    }
                    Err(e) => {
                        if json_looking(b, start) {
                            if invalid.is_none() {
                                invalid = Some(e.to_string());
                            }
                            i = end;
                        } else {
                            i = start + 1;
                        }
                    }
                }
            }
        }
    }
    if answers >= 2 {
        return Err(Rejection::whole(
            codes::MULTIPLE_JSON,
            format!("output holds {answers} JSON answers; expected exactly one object with all the operations"),
        ));
    }
    if truncated {
        return Err(Rejection::whole(
            codes::TRUNCATED_JSON,
            "JSON is cut off (brackets never close); the output was probably truncated",
        ));
    }
    if let Some(v) = answer {
        return Ok((v, true));
    }
    if let Some(e) = invalid {
        return Err(Rejection::whole(
            codes::INVALID_JSON,
            format!("JSON does not parse ({e}); expected valid JSON"),
        ));
    }
    if let Some(v) = parsed.into_iter().next() {
        return Ok((v, false));
    }
    Err(Rejection::whole(
        codes::NO_JSON,
        "no JSON found in the output; expected an object with the operations",
    ))
}

// ---------------------------------------------------------------------------------------------
// Step 6: from the value to a list of operations
// ---------------------------------------------------------------------------------------------

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// The value under the first alias present with a non-null value (smallest raw key on ties).
fn lookup<'a>(m: &'a Map<String, Value>, aliases: &[&str]) -> Option<&'a Value> {
    for alias in aliases {
        let mut best: Option<(&String, &Value)> = None;
        for (k, v) in m {
            if v.is_null() || !key_is(k, alias) {
                continue;
            }
            if !matches!(best, Some((bk, _)) if bk <= k) {
                best = Some((k, v));
            }
        }
        if let Some((_, v)) = best {
            return Some(v);
        }
    }
    None
}

fn list_or_compact<'a>(items: &'a [Value], whole: &'a Value) -> Vec<&'a Value> {
    match items.first() {
        Some(Value::String(_)) => vec![whole],
        _ => items.iter().collect(),
    }
}

fn operations_of(agent: Agent, value: &Value) -> Result<Vec<&Value>, Rejection> {
    let mut v = value;
    if let Value::Object(m) = v {
        if !has_any_key(m, &OP_KEYS) && !has_any_key(m, &OPS_KEYS) {
            if let Some(inner) = lookup(m, &[agent.as_str()]) {
                v = inner;
            } else if let Some(other) = m.keys().find_map(|k| {
                Agent::ALL
                    .iter()
                    .find(|a| **a != agent && key_is(k, a.as_str()))
            }) {
                return Err(Rejection::whole(
                    codes::WRONG_SHAPE,
                    format!(
                        "output is addressed to the {} agent; expected the {} agent's operations",
                        other.as_str(),
                        agent.as_str()
                    ),
                ));
            }
        }
    }
    let ops = match v {
        Value::Array(items) => list_or_compact(items, v),
        Value::Object(m) => {
            if let Some(list) = lookup(m, &OPS_KEYS) {
                match list {
                    Value::Array(items) => list_or_compact(items, list),
                    Value::Object(_) => vec![list],
                    other => {
                        return Err(Rejection::whole(
                            codes::WRONG_SHAPE,
                            format!(
                                "\"operations\" is a {}; expected a list of operations",
                                type_name(other)
                            ),
                        ))
                    }
                }
            } else if has_any_key(m, &OPS_KEYS) {
                // Present but null.
                return Err(Rejection::whole(
                    codes::WRONG_SHAPE,
                    "\"operations\" is null; expected a list of operations (an empty list if nothing to do)",
                ));
            } else if has_any_key(m, &OP_KEYS) {
                vec![v]
            } else {
                return Err(Rejection::whole(
                    codes::MISSING_OPERATIONS,
                    "JSON object has no \"operations\" list and no \"action\"/\"operation\" key",
                ));
            }
        }
        other => {
            return Err(Rejection::whole(
                codes::WRONG_SHAPE,
                format!(
                    "the answer is a {}; expected an object with the operations",
                    type_name(other)
                ),
            ))
        }
    };
    if ops.len() > MAX_OPERATIONS {
        return Err(Rejection::whole(
            codes::TOO_LARGE,
            format!(
                "{} operations; at most {MAX_OPERATIONS} are accepted",
                ops.len()
            ),
        ));
    }
    Ok(ops)
}

// ---------------------------------------------------------------------------------------------
// Step 7: one operation
// ---------------------------------------------------------------------------------------------

fn allowed(agent: Agent) -> &'static [Op] {
    match agent {
        Agent::Core => &[Op::Append, Op::Replace, Op::Rewrite, Op::Skip],
        Agent::Episodic => &[Op::Add, Op::Update, Op::Merge],
        Agent::Semantic => &[Op::Add, Op::Update, Op::Skip],
        Agent::Procedural => &[Op::Add, Op::Update],
    }
}

fn allowed_list(agent: Agent) -> String {
    let names: Vec<&str> = allowed(agent).iter().map(|o| o.as_str()).collect();
    names.join(", ")
}

const CONTENT: [&str; 4] = ["content", "text", "memory", "new_content"];
const REPLACE_OLD: [&str; 4] = ["old_text", "old", "old_content", "old_memory"];
const REPLACE_NEW: [&str; 5] = ["new_text", "new", "new_content", "content", "new_memory"];
const ADD_MEMORY: [&str; 4] = ["memory", "content", "text", "new_memory"];
const UPDATE_OLD: [&str; 3] = ["old_memory", "old", "old_text"];
const NEW_MEMORY: [&str; 5] = ["new_memory", "new", "new_text", "memory", "content"];
const MERGE_OLDS: [&str; 5] = ["old_memories", "olds", "old_memory", "old", "old_texts"];
const REASON: [&str; 1] = ["reason"];

/// What a field is called in messages (its canonical name).
fn text_field(idx: usize, op: Op, name: &str, v: Option<&Value>) -> Result<String, Rejection> {
    let opn = op.as_str();
    match v {
        None | Some(Value::Null) => Err(Rejection::at(
            idx,
            codes::MISSING_FIELD,
            format!("{opn} needs \"{name}\" (a non-empty string)"),
        )),
        Some(Value::String(s)) => check_text(idx, opn, name, s),
        Some(other) => Err(Rejection::at(
            idx,
            codes::WRONG_TYPE,
            format!(
                "{opn} \"{name}\" is a {}; expected a string",
                type_name(other)
            ),
        )),
    }
}

fn check_text(idx: usize, opn: &str, name: &str, s: &str) -> Result<String, Rejection> {
    let t = s.trim();
    if t.is_empty() {
        return Err(Rejection::at(
            idx,
            codes::EMPTY_FIELD,
            format!("{opn} \"{name}\" is empty; expected some text"),
        ));
    }
    let n = t.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(Rejection::at(
            idx,
            codes::TEXT_TOO_LONG,
            format!("{opn} \"{name}\" has {n} characters; at most {MAX_TEXT_CHARS} are accepted"),
        ));
    }
    Ok(t.to_string())
}

fn olds_field(idx: usize, op: Op, name: &str, v: Option<&Value>) -> Result<Vec<String>, Rejection> {
    let opn = op.as_str();
    match v {
        None | Some(Value::Null) => Err(Rejection::at(
            idx,
            codes::MISSING_FIELD,
            format!("{opn} needs \"{name}\" (a list of the memories it combines)"),
        )),
        Some(Value::String(s)) => Ok(vec![check_text(idx, opn, name, s)?]),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(Rejection::at(
                    idx,
                    codes::EMPTY_FIELD,
                    format!("{opn} \"{name}\" is an empty list; expected the memories it combines"),
                ));
            }
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => out.push(check_text(idx, opn, name, s)?),
                    other => {
                        return Err(Rejection::at(
                            idx,
                            codes::WRONG_TYPE,
                            format!(
                                "{opn} \"{name}\" holds a {}; expected strings only",
                                type_name(other)
                            ),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(other) => Err(Rejection::at(
            idx,
            codes::WRONG_TYPE,
            format!(
                "{opn} \"{name}\" is a {}; expected a list of strings",
                type_name(other)
            ),
        )),
    }
}

fn reason_field(idx: usize, v: Option<&Value>) -> Result<Option<String>, Rejection> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let t = s.trim();
            if t.is_empty() {
                Ok(None)
            } else {
                check_text(idx, "SKIP", "reason", s).map(Some)
            }
        }
        Some(other) => Err(Rejection::at(
            idx,
            codes::WRONG_TYPE,
            format!(
                "SKIP \"reason\" is a {}; expected a string",
                type_name(other)
            ),
        )),
    }
}

fn op_name(agent: Agent, idx: usize, v: Option<&Value>) -> Result<Op, Rejection> {
    let name = match v {
        None | Some(Value::Null) => {
            return Err(Rejection::at(
                idx,
                codes::MISSING_FIELD,
                format!(
                    "operation has no \"action\" (or \"operation\") key; expected one of {}",
                    allowed_list(agent)
                ),
            ))
        }
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(Rejection::at(
                idx,
                codes::WRONG_TYPE,
                format!(
                    "action name is a {}; expected a string, one of {}",
                    type_name(other),
                    allowed_list(agent)
                ),
            ))
        }
    };
    let Some(op) = Op::parse(name) else {
        let shown: String = name.chars().take(40).collect();
        return Err(Rejection::at(
            idx,
            codes::UNKNOWN_ACTION,
            format!(
                "unknown action {shown:?}; expected one of {}",
                allowed_list(agent)
            ),
        ));
    };
    if !allowed(agent).contains(&op) {
        return Err(Rejection::at(
            idx,
            codes::ACTION_NOT_ALLOWED,
            format!(
                "the {} agent cannot {}; expected one of {}",
                agent.as_str(),
                op.as_str(),
                allowed_list(agent)
            ),
        ));
    }
    Ok(op)
}

fn validate_operation(agent: Agent, idx: usize, v: &Value) -> Result<Action, Rejection> {
    let mk = |op: Op, text: Option<String>, old: Vec<String>, reason: Option<String>| Action {
        agent,
        op,
        text,
        old,
        reason,
    };
    match v {
        Value::Object(m) => {
            let op = op_name(agent, idx, lookup(m, &OP_KEYS))?;
            let core = agent == Agent::Core;
            match op {
                Op::Append | Op::Rewrite => {
                    let t = text_field(idx, op, "content", lookup(m, &CONTENT))?;
                    Ok(mk(op, Some(t), vec![], None))
                }
                Op::Replace => {
                    let old = text_field(idx, op, "old_text", lookup(m, &REPLACE_OLD))?;
                    let t = text_field(idx, op, "new_text", lookup(m, &REPLACE_NEW))?;
                    Ok(mk(op, Some(t), vec![old], None))
                }
                Op::Add => {
                    let t = text_field(idx, op, "memory", lookup(m, &ADD_MEMORY))?;
                    Ok(mk(op, Some(t), vec![], None))
                }
                Op::Update => {
                    let old = text_field(idx, op, "old_memory", lookup(m, &UPDATE_OLD))?;
                    let t = text_field(idx, op, "new_memory", lookup(m, &NEW_MEMORY))?;
                    Ok(mk(op, Some(t), vec![old], None))
                }
                Op::Merge => {
                    let olds = olds_field(idx, op, "old_memories", lookup(m, &MERGE_OLDS))?;
                    let t = text_field(idx, op, "new_memory", lookup(m, &NEW_MEMORY))?;
                    Ok(mk(op, Some(t), olds, None))
                }
                Op::Skip => {
                    let _ = core;
                    Ok(mk(op, None, vec![], reason_field(idx, lookup(m, &REASON))?))
                }
            }
        }
        Value::Array(items) => {
            let op = op_name(agent, idx, items.first())?;
            let (min, max, names): (usize, usize, &[&str]) = match op {
                Op::Append | Op::Rewrite => (2, 2, &["content"]),
                Op::Add => (2, 2, &["memory"]),
                Op::Replace => (3, 3, &["old_text", "new_text"]),
                Op::Update => (3, 3, &["old_memory", "new_memory"]),
                Op::Merge => (3, 3, &["old_memories", "new_memory"]),
                Op::Skip => (1, 2, &["reason"]),
            };
            if items.len() < min {
                return Err(Rejection::at(
                    idx,
                    codes::MISSING_FIELD,
                    format!(
                        "compact {} has {} element(s); expected [\"{}\", {}]",
                        op.as_str(),
                        items.len(),
                        op.as_str(),
                        names.join(", ")
                    ),
                ));
            }
            if items.len() > max {
                return Err(Rejection::at(
                    idx,
                    codes::WRONG_SHAPE,
                    format!(
                        "compact {} has {} elements; expected [\"{}\", {}]",
                        op.as_str(),
                        items.len(),
                        op.as_str(),
                        names.join(", ")
                    ),
                ));
            }
            match op {
                Op::Append | Op::Rewrite => Ok(mk(op, Some(text_field(idx, op, "content", items.get(1))?), vec![], None)),
                Op::Add => Ok(mk(op, Some(text_field(idx, op, "memory", items.get(1))?), vec![], None)),
                Op::Replace | Op::Update => {
                    let (on, nn) = if op == Op::Replace { ("old_text", "new_text") } else { ("old_memory", "new_memory") };
                    let old = text_field(idx, op, on, items.get(1))?;
                    let t = text_field(idx, op, nn, items.get(2))?;
                    Ok(mk(op, Some(t), vec![old], None))
                }
                Op::Merge => {
                    let olds = olds_field(idx, op, "old_memories", items.get(1))?;
                    let t = text_field(idx, op, "new_memory", items.get(2))?;
                    Ok(mk(op, Some(t), olds, None))
                }
                Op::Skip => Ok(mk(op, None, vec![], reason_field(idx, items.get(1))?)),
            }
        }
        other => Err(Rejection::at(
            idx,
            codes::WRONG_TYPE,
            format!(
                "operation is a {}; expected an object like {{\"action\": ..., ...}} or a compact list",
                type_name(other)
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codes_of(r: &ParseResult) -> Vec<&'static str> {
        r.rejections.iter().map(|x| x.code).collect()
    }

    fn ok(agent: Agent, raw: &str) -> ParseResult {
        let r = parse(agent, raw);
        assert!(r.ok(), "expected ok for {raw:?}, got {:?}", r.rejections);
        r
    }

    fn rejected(agent: Agent, raw: &str, code: &str) {
        let r = parse(agent, raw);
        assert!(
            codes_of(&r).contains(&code),
            "expected {code} for {raw:?}, got {:?}",
            r.rejections
        );
        for rej in &r.rejections {
            assert!(!rej.message.is_empty());
            assert!(codes::ALL.contains(&rej.code));
        }
    }

    #[test]
    fn canonical_core_and_banks() {
        let r = ok(
            Agent::Core,
            r#"{"operation": "APPEND", "content": "Likes tea."}"#,
        );
        assert_eq!(r.actions.len(), 1);
        assert_eq!(r.actions[0].op, Op::Append);
        assert_eq!(r.actions[0].text.as_deref(), Some("Likes tea."));
        assert_eq!(r.content_chars, 10);

        let r = ok(
            Agent::Core,
            r#"{"operation":"REPLACE","old_text":"tea","new_text":"coffee"}"#,
        );
        assert_eq!(r.actions[0].old, vec!["tea".to_string()]);
        assert_eq!(r.content_chars, 6);

        let r = ok(
            Agent::Episodic,
            r#"{"operations": [{"action":"ADD","memory":"2023-05-08: went hiking"},
               {"action":"UPDATE","old_memory":"a","new_memory":"b"},
               {"action":"MERGE","old_memories":["x","y"],"new_memory":"xy"}]}"#,
        );
        assert_eq!(r.actions.len(), 3);
        assert_eq!(r.actions[2].old, vec!["x".to_string(), "y".to_string()]);
        assert_eq!(r.content_chars, 23 + 1 + 2);
        let r = ok(
            Agent::Semantic,
            r#"{"operations": [{"action":"SKIP","reason":"nothing new"}]}"#,
        );
        assert_eq!(r.actions[0].reason.as_deref(), Some("nothing new"));
        let r = ok(Agent::Procedural, r#"{"operations": []}"#);
        assert!(r.actions.is_empty());
    }

    #[test]
    fn tolerated_wrappers() {
        let body = r#"{"operations": [{"action": "add", "memory": "m"},]}"#;
        for raw in [
            format!("<think>let me think {{ about [it</think>\n{body}"),
            format!("<THINKING>hmm</THINKING>{body}"),
            format!("reasoning without an opening tag</think>{body}"),
            format!("```json\n{body}\n```"),
            format!("Sure! Here are the operations:\n{body}\nHope this helps [1]."),
            r#"[{"action":"ADD","memory":"m"}]"#.to_string(),
            r#"{"episodic": {"operations": [{"action":"ADD","memory":"m"}]}}"#.to_string(),
            r#"[["ADD", "m"]]"#.to_string(),
            r#"["ADD", "m"]"#.to_string(),
            r#"{"Operations": [{"Action": " Add ", "Memory": " m "}]}"#.to_string(),
            r#"{"action":"ADD","memory":"m"}"#.to_string(),
        ] {
            let r = ok(Agent::Episodic, &raw);
            assert_eq!(r.actions.len(), 1, "{raw}");
            assert_eq!(r.actions[0].text.as_deref(), Some("m"), "{raw}");
        }
        let r = ok(
            Agent::Core,
            r#"{"operations": [["APPEND", "a"], ["REPLACE", "a", "b"], ["SKIP", "why"]]}"#,
        );
        assert_eq!(r.actions.len(), 3);
        let r = ok(Agent::Episodic, r#"[["MERGE", ["a", "b"], "ab"]]"#);
        assert_eq!(r.actions[0].old.len(), 2);
        ok(Agent::Core, r#"{"operation": "SKIP"}"#);
        // A tag inside the JSON is not a reasoning block.
        let r = ok(
            Agent::Core,
            r#"{"operation": "APPEND", "content": "asked what <THINK> means"}"#,
        );
        assert_eq!(
            r.actions[0].text.as_deref(),
            Some("asked what <THINK> means")
        );
        let r = ok(
            Agent::Core,
            r#"<think>a</think> <thinking>b</thinking> {"operation": "APPEND", "content": "x </think>"}"#,
        );
        assert_eq!(r.actions[0].text.as_deref(), Some("x </think>"));
        let r = ok(
            Agent::Core,
            r#"{"operation": "APPEND", "content": "x </think> y"}"#,
        );
        assert_eq!(r.actions[0].text.as_deref(), Some("x </think> y"));
    }

    #[test]
    fn rejections() {
        rejected(Agent::Core, "   ", codes::EMPTY_OUTPUT);
        rejected(Agent::Core, "I have nothing to add.", codes::NO_JSON);
        rejected(Agent::Core, "<think>only thinking</think>", codes::NO_JSON);
        rejected(
            Agent::Core,
            r#"{"operation": "APPEND", "content": "x" "y"}"#,
            codes::INVALID_JSON,
        );
        rejected(
            Agent::Core,
            r#"{"operation": "APPEND", "content": "cut"#,
            codes::TRUNCATED_JSON,
        );
        rejected(
            Agent::Core,
            r#"{"operation":"APPEND","content":"a"} {"operation":"APPEND","content":"b"}"#,
            codes::MULTIPLE_JSON,
        );
        rejected(
            Agent::Core,
            &format!("{}{}", "[".repeat(200), "]".repeat(200)),
            codes::TOO_DEEP,
        );
        rejected(
            Agent::Core,
            &"x".repeat(MAX_INPUT_BYTES + 1),
            codes::TOO_LARGE,
        );
        rejected(
            Agent::Core,
            r#""{\"operation\": \"APPEND\", \"content\": \"x\"}""#,
            codes::WRONG_SHAPE,
        );
        rejected(
            Agent::Episodic,
            r#"{"semantic": {"operations": []}}"#,
            codes::WRONG_SHAPE,
        );
        rejected(
            Agent::Episodic,
            r#"{"memories": ["a"]}"#,
            codes::MISSING_OPERATIONS,
        );
        rejected(
            Agent::Episodic,
            r#"{"operations": [{"action": "DELETE", "memory": "a"}]}"#,
            codes::UNKNOWN_ACTION,
        );
        rejected(
            Agent::Procedural,
            r#"{"operations": [{"action": "MERGE", "old_memories": ["a"], "new_memory": "b"}]}"#,
            codes::ACTION_NOT_ALLOWED,
        );
        rejected(
            Agent::Core,
            r#"{"operation": "ADD", "memory": "a"}"#,
            codes::ACTION_NOT_ALLOWED,
        );
        rejected(
            Agent::Episodic,
            r#"{"operations": [{"action": "UPDATE", "new_memory": "b"}]}"#,
            codes::MISSING_FIELD,
        );
        rejected(
            Agent::Episodic,
            r#"{"operations": [{"action": "ADD", "memory": 5}]}"#,
            codes::WRONG_TYPE,
        );
        rejected(
            Agent::Episodic,
            r#"{"operations": [{"action": "ADD", "memory": "  "}]}"#,
            codes::EMPTY_FIELD,
        );
        let long = "y".repeat(MAX_TEXT_CHARS + 1);
        rejected(
            Agent::Episodic,
            &format!(r#"{{"operations": [{{"action": "ADD", "memory": "{long}"}}]}}"#),
            codes::TEXT_TOO_LONG,
        );
        rejected(
            Agent::Episodic,
            r#"{"operations": [{"action": "ADD", "memory": "\ud800"}]}"#,
            codes::INVALID_JSON,
        );
        rejected(
            Agent::Episodic,
            r#"{"operations": ["ADD"]}"#,
            codes::MISSING_FIELD,
        );
        rejected(
            Agent::Episodic,
            r#"{"operations": [["ADD", "a", "b"]]}"#,
            codes::WRONG_SHAPE,
        );
    }

    #[test]
    fn valid_ops_are_kept_beside_rejected_ones() {
        let r = parse(
            Agent::Semantic,
            r#"{"operations": [{"action":"ADD","memory":"a"}, {"action":"MERGE","old_memories":["a"],"new_memory":"b"}, {"action":"ADD"}]}"#,
        );
        assert!(!r.ok());
        assert_eq!(r.actions.len(), 1);
        assert_eq!(
            r.rejections.iter().map(|x| x.index).collect::<Vec<_>>(),
            vec![Some(1), Some(2)]
        );
        assert_eq!(
            codes_of(&r),
            vec![codes::ACTION_NOT_ALLOWED, codes::MISSING_FIELD]
        );
        assert_eq!(r.content_chars, 1);
    }

    #[test]
    fn canonical_json_round_trips() {
        let r = ok(
            Agent::Episodic,
            r#"[["ADD","a"],["UPDATE","o","n"],["MERGE",["p","q"],"pq"]]"#,
        );
        let j = r.to_json();
        assert_eq!(
            j,
            r#"{"operations":[{"action":"ADD","memory":"a"},{"action":"UPDATE","new_memory":"n","old_memory":"o"},{"action":"MERGE","new_memory":"pq","old_memories":["p","q"]}]}"#
        );
        let again = ok(Agent::Episodic, &j);
        assert_eq!(again.actions, r.actions);
        assert_eq!(r.content_text(), "a\nn\npq");
    }

    #[test]
    fn validate_action_checks_fields() {
        let good = Action {
            agent: Agent::Episodic,
            op: Op::Add,
            text: Some(" x ".into()),
            old: vec![],
            reason: None,
        };
        assert_eq!(validate_action(&good).unwrap().text.as_deref(), Some("x"));
        let bad = Action {
            agent: Agent::Procedural,
            op: Op::Skip,
            text: None,
            old: vec![],
            reason: None,
        };
        assert_eq!(
            validate_action(&bad).unwrap_err().code,
            codes::ACTION_NOT_ALLOWED
        );
        let bad = Action {
            agent: Agent::Episodic,
            op: Op::Add,
            text: Some("x".into()),
            old: vec!["y".into()],
            reason: None,
        };
        assert_eq!(validate_action(&bad).unwrap_err().code, codes::WRONG_SHAPE);
        let bad = Action {
            agent: Agent::Episodic,
            op: Op::Update,
            text: Some("x".into()),
            old: vec![],
            reason: None,
        };
        assert_eq!(
            validate_action(&bad).unwrap_err().code,
            codes::MISSING_FIELD
        );
    }

    #[test]
    fn batch_matches_single() {
        let items: Vec<(Agent, &str)> = vec![
            (Agent::Core, r#"{"operation":"APPEND","content":"a"}"#),
            (Agent::Episodic, "nope"),
            (Agent::Semantic, r#"[["SKIP"]]"#),
        ];
        let out = parse_batch(&items);
        for ((a, raw), r) in items.iter().zip(out) {
            assert_eq!(parse(*a, raw), r);
        }
    }

    fn json_ish() -> impl Strategy<Value = String> {
        let atoms = prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "\\",
            "\\u",
            "d800",
            "<think>",
            "</think>",
            "<thinking>",
            "```json",
            "\"operations\"",
            "\"action\"",
            "\"operation\"",
            "\"ADD\"",
            "\"MERGE\"",
            "\"memory\"",
            "\"old_memories\"",
            "\"content\"",
            "\"APPEND\"",
            "\"episodic\"",
            "null",
            "1e999",
            "-",
            "true",
            " ",
            "\n",
            "é",
            "😀",
            "x",
        ]);
        prop::collection::vec(atoms, 0..80).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn find_either_matches_position(
            b in proptest::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), Just(0x22u8 ^ 0x80), Just(0u8), Just(0xffu8), any::<u8>()], 0..40),
            x in prop_oneof![Just(b'"'), Just(b'{'), any::<u8>()],
            y in prop_oneof![Just(b'\\'), Just(b'['), any::<u8>()],
        ) {
            prop_assert_eq!(find_either(&b, x, y), b.iter().position(|&c| c == x || c == y));
        }
    }

    proptest! {
        #[test]
        fn content_approx_tokens_counts_the_content_text(
            texts in prop::collection::vec("[a-zé😀 ]{0,30}", 0..6),
            agent in 0usize..4,
        ) {
            let ops: Vec<Value> = texts
                .iter()
                .map(|t| serde_json::json!({"action": "ADD", "memory": t}))
                .collect();
            let raw = if agent == 0 {
                serde_json::json!({"operation": "APPEND", "content": texts.join(" ")}).to_string()
            } else {
                serde_json::json!({ "operations": ops }).to_string()
            };
            let r = parse(Agent::ALL[agent], &raw);
            prop_assert_eq!(r.content_approx_tokens(), r.content_text().chars().count() / 4);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        #[test]
        fn never_panics_on_any_string(s in ".{0,400}", agent in 0usize..4) {
            let r = parse(Agent::ALL[agent], &s);
            prop_assert!(r.ok() || !r.rejections.is_empty());
        }

        #[test]
        fn never_panics_on_lossy_bytes(b in prop::collection::vec(any::<u8>(), 0..400), agent in 0usize..4) {
            let s = String::from_utf8_lossy(&b);
            let _ = parse(Agent::ALL[agent], &s);
        }

        #[test]
        fn never_panics_on_json_ish(s in json_ish(), agent in 0usize..4) {
            let r = parse(Agent::ALL[agent], &s);
            for rej in &r.rejections {
                prop_assert!(codes::ALL.contains(&rej.code));
            }
            prop_assert_eq!(r.content_chars, content_chars(&r.actions));
        }

        #[test]
        fn mutated_valid_outputs_never_panic(
            texts in prop::collection::vec("[a-z][a-z ]{0,19}", 1..5),
            cut in 0usize..400,
            insert in prop::sample::select(vec!["{", "}", "[", "]", ",", "\"", "\\", ""]),
        ) {
            let ops: Vec<String> = texts.iter().map(|t| format!(r#"{{"action":"ADD","memory":"{t}"}}"#)).collect();
            let raw = format!(r#"{{"operations":[{}]}}"#, ops.join(","));
            let full = parse(Agent::Episodic, &raw);
            prop_assert!(full.ok());
            prop_assert_eq!(full.actions.len(), texts.len());
            let at = cut.min(raw.len());
            let mutated = format!("{}{}{}", &raw[..at], insert, &raw[at..]);
            let _ = parse(Agent::Episodic, &mutated);
            let _ = parse(Agent::Episodic, &raw[..at]);
        }

        #[test]
        fn canonical_json_is_a_fixed_point(texts in prop::collection::vec("\\PC{1,30}", 0..6)) {
            let ops: Vec<Value> = texts.iter().map(|t| serde_json::json!({"action": "ADD", "memory": t})).collect();
            let raw = serde_json::json!({"operations": ops}).to_string();
            let r = parse(Agent::Semantic, &raw);
            let again = parse(Agent::Semantic, &r.to_json());
            prop_assert_eq!(&again.actions, &r.actions);
            prop_assert_eq!(again.to_json(), r.to_json());
        }
    }
}
