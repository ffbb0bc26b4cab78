//! The vocabulary shared by every module: agents, bank kinds, operations and validated actions.

use serde::{Deserialize, Serialize};

/// The four memory agents, one LLM call each per session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Agent {
    Core,
    Episodic,
    Semantic,
    Procedural,
}

impl Agent {
    pub const ALL: [Agent; 4] = [
        Agent::Core,
        Agent::Episodic,
        Agent::Semantic,
        Agent::Procedural,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Agent::Core => "core",
            Agent::Episodic => "episodic",
            Agent::Semantic => "semantic",
            Agent::Procedural => "procedural",
        }
    }

    pub fn parse(name: &str) -> Option<Agent> {
        match name.trim().to_ascii_lowercase().as_str() {
            "core" => Some(Agent::Core),
            "episodic" => Some(Agent::Episodic),
            "semantic" => Some(Agent::Semantic),
            "procedural" => Some(Agent::Procedural),
            _ => None,
        }
    }

    /// The bank this agent writes to; `None` for the core agent, which owns the core block.
    pub fn bank(self) -> Option<BankKind> {
        match self {
            Agent::Core => None,
            Agent::Episodic => Some(BankKind::Episodic),
            Agent::Semantic => Some(BankKind::Semantic),
            Agent::Procedural => Some(BankKind::Procedural),
        }
    }
}

/// The three retrievable banks. The discriminant is the kind code used in arrays (-1 = padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(i8)]
pub enum BankKind {
    Episodic = 0,
    Semantic = 1,
    Procedural = 2,
}

impl BankKind {
    pub const ALL: [BankKind; 3] = [BankKind::Episodic, BankKind::Semantic, BankKind::Procedural];

    pub fn as_str(self) -> &'static str {
        match self {
            BankKind::Episodic => "episodic",
            BankKind::Semantic => "semantic",
            BankKind::Procedural => "procedural",
        }
    }

    pub fn code(self) -> i8 {
        self as i8
    }

    pub fn from_code(code: i8) -> Option<BankKind> {
        match code {
            0 => Some(BankKind::Episodic),
            1 => Some(BankKind::Semantic),
            2 => Some(BankKind::Procedural),
            _ => None,
        }
    }

    pub fn parse(name: &str) -> Option<BankKind> {
        match name.trim().to_ascii_lowercase().as_str() {
            "episodic" => Some(BankKind::Episodic),
            "semantic" => Some(BankKind::Semantic),
            "procedural" => Some(BankKind::Procedural),
            _ => None,
        }
    }

    pub fn agent(self) -> Agent {
        match self {
            BankKind::Episodic => Agent::Episodic,
            BankKind::Semantic => Agent::Semantic,
            BankKind::Procedural => Agent::Procedural,
        }
    }
}

/// A memory operation. Which ones an agent may use is decided by the validator in `actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Op {
    // core block
    Append,
    Replace,
    Rewrite,
    // banks
    Add,
    Update,
    Merge,
    // both (tolerated for core, a real action for semantic)
    Skip,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Append => "APPEND",
            Op::Replace => "REPLACE",
            Op::Rewrite => "REWRITE",
            Op::Add => "ADD",
            Op::Update => "UPDATE",
            Op::Merge => "MERGE",
            Op::Skip => "SKIP",
        }
    }

    pub fn parse(name: &str) -> Option<Op> {
        match name.trim().to_ascii_uppercase().as_str() {
            "APPEND" => Some(Op::Append),
            "REPLACE" => Some(Op::Replace),
            "REWRITE" => Some(Op::Rewrite),
            "ADD" => Some(Op::Add),
            "UPDATE" => Some(Op::Update),
            "MERGE" => Some(Op::Merge),
            "SKIP" => Some(Op::Skip),
            _ => None,
        }
    }
}

/// One validated operation.
///
/// `text` is the new text (APPEND/REWRITE content, REPLACE new_text, ADD memory, UPDATE/MERGE
/// new_memory); `old` the texts the operation names (REPLACE old_text, UPDATE old_memory, MERGE
/// old_memories); `reason` a SKIP's reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub agent: Agent,
    pub op: Op,
    pub text: Option<String>,
    pub old: Vec<String>,
    pub reason: Option<String>,
}
