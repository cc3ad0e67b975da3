//! Identifiers of the domain: opaque UUIDv7 ids for runs, task runs and artifacts, and
//! validated names for tasks and pipelines.
//!
//! UUIDv7 (RFC 9562, section 5.7) is time-ordered, so ids sort by creation time and index
//! well in B-trees.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered id (UUIDv7).
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s.trim()).map(Self).map_err(|_| IdError::Malformed {
                    kind: stringify!($name),
                    value: s.to_owned(),
                })
            }
        }
    };
}

uuid_id!(
    /// Identifies one run of a pipeline.
    RunId
);
uuid_id!(
    /// Identifies one task run: one task of a run, or one item of a fan-out.
    TaskRunId
);
uuid_id!(
    /// Identifies one item of the validation queue.
    ReviewId
);
uuid_id!(
    /// Identifies one stored artifact version.
    ArtifactId
);
uuid_id!(
    /// Identifies an organization: the tenant every pipeline, run, artifact and audit
    /// event belongs to.
    OrgId
);
uuid_id!(
    /// Identifies a user account.
    UserId
);
uuid_id!(
    /// Identifies a login session (a refresh-token family).
    SessionId
);
uuid_id!(
    /// Identifies a personal API key.
    ApiKeyId
);
uuid_id!(
    /// Identifies an invitation to an organization.
    InvitationId
);

impl OrgId {
    /// The default organization of a single-tenant installation: created by the first
    /// migration, so the CLI and a fresh server share it. Its id is fixed
    /// (`00000000-0000-0000-0000-000000000001`) so every process agrees without a lookup.
    pub const DEFAULT: OrgId = OrgId(Uuid::from_u128(1));
}

/// Errors of id and name parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// The text is not a UUID.
    #[error("malformed {kind}: {value:?} is not a UUID")]
    Malformed {
        /// The kind of id expected.
        kind: &'static str,
        /// The text given.
        value: String,
    },
    /// The name breaks the naming rule.
    #[error("invalid {kind} {value:?}: {rule}")]
    InvalidName {
        /// The kind of name expected.
        kind: &'static str,
        /// The text given.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
}

/// Longest task id or pipeline name, in bytes.
pub const NAME_LEN_MAX: usize = 128;

fn check_name(kind: &'static str, value: &str) -> Result<(), IdError> {
    let rule =
        "use 1 to 128 characters from a-z, A-Z, 0-9, '_' and '-', starting with a letter or '_'";
    let mut chars = value.chars();
    let ok = value.len() <= NAME_LEN_MAX
        && matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(IdError::InvalidName {
            kind,
            value: value.to_owned(),
            rule,
        })
    }
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks the naming rule: 1 to 128 characters of `[A-Za-z0-9_-]`, starting with a
            /// letter or `_`.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_name($kind, &value)?;
                Ok(Self(value))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_id!(
    /// The id of a task inside a pipeline, unique within it.
    TaskId,
    "task id"
);
name_id!(
    /// The name of a pipeline.
    PipelineName,
    "pipeline name"
);
name_id!(
    /// The name of a tool an org registered (built-in tool names are reserved).
    ToolName,
    "tool name"
);
name_id!(
    /// The name of an org's secret, as tools see it (an environment variable of a `wasm`
    /// tool, `secrets.<name>` in the templates of an `http` tool).
    SecretName,
    "secret name"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_follow_the_naming_rule() {
        assert!(TaskId::parse("by_species-2").is_ok());
        assert!(TaskId::parse("2fast").is_err());
        assert!(TaskId::parse("").is_err());
        assert!(TaskId::parse("a b").is_err());
        assert!(TaskId::parse("x".repeat(129)).is_err());
    }

    #[test]
    fn run_ids_round_trip_through_text() {
        let id = RunId::new();
        assert_eq!(id.to_string().parse::<RunId>().unwrap(), id);
        assert!("nope".parse::<RunId>().is_err());
    }
}
