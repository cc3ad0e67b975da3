//! Reading a pipeline from YAML or JSON text while remembering where every value came from.
//!
//! The text is parsed with `marked_yaml`, which keeps the line and column of every node, into
//! a [`serde_json::Value`] and a [`SourceMap`] from JSON Pointers (RFC 6901) to positions.
//! JSON is read by the same parser: YAML 1.2 is a superset of JSON for documents like ours.
//! Plain (unquoted) scalars are typed by the YAML 1.2 core schema (section 10.3 of the YAML 1.2
//! specification): `null`/`~`/empty, `true`/`false`, integers and floats; quoted scalars stay
//! strings. Duplicate keys, anchors, aliases and tags are refused: a pipeline should read the
//! same to a person as to the engine.
//!
//! [`parse_pipeline`] then reads the definition in two levels, the top-level fields and each
//! param and task on its own, so that one broken task does not hide the problems of the
//! others. This module must never look at tools or the DAG: that is
//! [`crate::pipeline::validate`]'s job.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use marked_yaml::{LoadError, LoaderOptions, Node};
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

use super::{Diagnostic, ParamDef, PipelineDef, TaskDef};
use crate::ids::{PipelineName, TaskId};

/// Deepest nesting of mappings and sequences a document may have. Pipelines are shallow;
/// the bound keeps the recursive conversion far from the stack's limit.
pub const DEPTH_MAX: usize = 128;

/// Fields of a pipeline, for unknown-field hints.
const PIPELINE_FIELDS: &[&str] = &["name", "description", "params", "concurrency", "tasks"];
/// Fields of a param.
const PARAM_FIELDS: &[&str] = &["type", "default", "description"];
/// Fields of a task.
const TASK_FIELDS: &[&str] = &[
    "id",
    "tool",
    "description",
    "with",
    "depends_on",
    "retry",
    "timeout",
    "if",
    "for_each",
    "compensate",
    "sandbox",
    "worker_tags",
    "review",
];

/// Where the values of a document are: JSON Pointers to 1-based `(line, column)` positions.
///
/// Two positions are kept for a mapping entry: the value's (for `/tasks/0/tool`, the position
/// of `sql` in `tool: sql`) and the key's (the position of `tool`), so that a problem with
/// the field itself, an unknown field for instance, can point at its name. A mapping's own
/// position is that of its first key, a sequence's that of its first `-` or `[`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceMap {
    values: HashMap<String, (u32, u32)>,
    keys: HashMap<String, (u32, u32)>,
}

impl SourceMap {
    /// The position of the value at `pointer`, or of its nearest ancestor that has one.
    /// `None` only for an empty map.
    pub fn locate(&self, pointer: &str) -> Option<(u32, u32)> {
        let mut current = pointer;
        loop {
            if let Some(position) = self.values.get(current).or_else(|| self.keys.get(current)) {
                return Some(*position);
            }
            if current.is_empty() {
                return None;
            }
            current = parent_pointer(current);
        }
    }

    /// The position of the key of the mapping entry at `pointer` (for `/tasks/0/tool`, where
    /// `tool` is written); falls back to [`SourceMap::locate`] when `pointer` names no key.
    pub fn locate_key(&self, pointer: &str) -> Option<(u32, u32)> {
        self.keys
            .get(pointer)
            .copied()
            .or_else(|| self.locate(pointer))
    }

    /// Number of values located.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no value is located.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// The pointer one level up: `/tasks/2/depends_on` for `/tasks/2/depends_on/0`, and `""` for
/// a top-level field.
fn parent_pointer(pointer: &str) -> &str {
    pointer.rfind('/').map_or("", |at| &pointer[..at])
}

/// Appends one reference token to a JSON Pointer, escaping `~` and `/` (RFC 6901, section 3).
pub fn pointer_push(pointer: &str, token: &str) -> String {
    let mut out = String::with_capacity(pointer.len() + token.len() + 1);
    out.push_str(pointer);
    out.push('/');
    for c in token.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
    out
}

/// Builds a diagnostic located through `map` at the value of `pointer`.
pub(crate) fn diagnostic(
    code: &'static str,
    message: String,
    file: &str,
    map: Option<&SourceMap>,
    pointer: &str,
    hint: Option<String>,
) -> Diagnostic {
    let position = map.and_then(|m| m.locate(pointer));
    Diagnostic {
        code,
        message,
        file: file.to_owned(),
        line: position.map(|p| p.0),
        column: position.map(|p| p.1),
        pointer: pointer.to_owned(),
        hint,
    }
}

/// Builds a diagnostic located through `map` at the key of `pointer`.
pub(crate) fn key_diagnostic(
    code: &'static str,
    message: String,
    file: &str,
    map: Option<&SourceMap>,
    pointer: &str,
    hint: Option<String>,
) -> Diagnostic {
    let mut out = diagnostic(code, message, file, None, pointer, hint);
    if let Some((line, column)) = map.and_then(|m| m.locate_key(pointer)) {
        out.line = Some(line);
        out.column = Some(column);
    }
    out
}

/// Sorts diagnostics by position (unlocated ones last), then pointer and code.
pub(crate) fn sort_diagnostics(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by(|a, b| {
        let key = |d: &Diagnostic| (d.line.is_none(), d.line, d.column);
        key(a)
            .cmp(&key(b))
            .then_with(|| a.pointer.cmp(&b.pointer))
            .then_with(|| a.code.cmp(b.code))
            .then_with(|| a.message.cmp(&b.message))
    });
}

/// Levenshtein edit distance over characters (V. I. Levenshtein, 1965), with one row of
/// memory.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// The candidate closest to `target` by edit distance, if it is close enough to be a likely
/// typo: at most one edit for names of up to three characters, two up to eight, and a third
/// of the length beyond. A name that differs only in case is the closest of all.
pub(crate) fn closest<'a>(
    target: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let length = target.chars().count();
    let allowed = match length {
        0..=3 => 1,
        4..=8 => 2,
        n => n / 3,
    };
    let lowered = target.to_lowercase();
    candidates
        .into_iter()
        .filter(|candidate| *candidate != target)
        .map(|candidate| {
            let distance = if candidate.to_lowercase() == lowered {
                0
            } else {
                edit_distance(target, candidate)
            };
            (distance, candidate)
        })
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, candidate)| (*distance, *candidate))
        .map(|(_, candidate)| candidate)
}

/// A hint naming the closest candidate, or listing the candidates (at most `LIST_MAX`).
pub(crate) fn suggestion(target: &str, candidates: &[&str], kind: &str) -> String {
    const LIST_MAX: usize = 20;
    if let Some(best) = closest(target, candidates.iter().copied()) {
        return format!("did you mean `{best}`?");
    }
    if candidates.is_empty() {
        return format!("there are no {kind}");
    }
    let mut listed: Vec<String> = candidates
        .iter()
        .take(LIST_MAX)
        .map(|c| format!("`{c}`"))
        .collect();
    if candidates.len() > LIST_MAX {
        listed.push(format!("and {} more", candidates.len() - LIST_MAX));
    }
    format!("{kind}: {}", listed.join(", "))
}

/// Parses YAML or JSON text into a JSON value and the positions of its parts.
///
/// The top level must be a mapping. `file` names the source in diagnostics.
///
/// # Errors
/// One diagnostic: `malformed_yaml` (or `malformed_json` for text that looks like JSON and
/// is not) with the parser's line and column, `duplicate_key` for a key written twice in
/// one mapping, or `too_deep` past [`DEPTH_MAX`] levels of nesting.
pub fn parse_document(file: &str, text: &str) -> Result<(Value, SourceMap), Vec<Diagnostic>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let node = marked_yaml::parse_yaml_with_options(0, text, options)
        .map_err(|err| vec![load_error(file, text, err)])?;
    let mut map = SourceMap::default();
    let value = convert(&node, String::new(), 0, &mut map).map_err(|pointer| {
        vec![diagnostic(
            "too_deep",
            format!("the document nests deeper than {DEPTH_MAX} levels"),
            file,
            Some(&map),
            &pointer,
            Some("flatten the structure; pipelines rarely need more than a few levels".to_owned()),
        )]
    })?;
    Ok((value, map))
}

/// Turns a loader error into a diagnostic.
fn load_error(file: &str, text: &str, err: LoadError) -> Diagnostic {
    let located = |code: &'static str,
                   message: String,
                   marker: &marked_yaml::Marker,
                   hint: &str| Diagnostic {
        code,
        message,
        file: file.to_owned(),
        line: Some(to_u32(marker.line())),
        column: Some(to_u32(marker.column())),
        pointer: String::new(),
        hint: Some(hint.to_owned()),
    };
    let looks_like_json = text.trim_start().starts_with('{');
    match &err {
        LoadError::ScanError(marker, scan) => {
            if looks_like_json {
                if let Err(json) = serde_json::from_str::<Value>(text) {
                    let message = json.to_string();
                    // serde_json appends " at line L column C"; the position has its own fields.
                    let message = message
                        .rsplit_once(" at line ")
                        .map_or(message.as_str(), |(m, _)| m);
                    return Diagnostic {
                        code: "malformed_json",
                        message: format!("malformed JSON: {message}"),
                        file: file.to_owned(),
                        line: Some(to_u32(json.line())),
                        column: Some(to_u32(json.column())),
                        pointer: String::new(),
                        hint: Some(
                            "check the brackets, commas and quotes around this position".to_owned(),
                        ),
                    };
                }
            }
            located(
                "malformed_yaml",
                format!("malformed YAML: {}", scan.info()),
                marker,
                "check the indentation and the `:` and `-` around this position; quote values that contain `: ` or start with `{`, `[`, `*`, `&` or `!`",
            )
        }
        LoadError::DuplicateKey(inner) => {
            let first_line = inner.prev_key.span().start().map_or(0, |m| m.line());
            let marker = inner
                .key
                .span()
                .start()
                .copied()
                .unwrap_or_else(|| marked_yaml::Marker::new(0, 0, 1, 1));
            located(
                "duplicate_key",
                format!(
                    "key `{}` is written twice in one mapping (first on line {first_line})",
                    inner.key.as_str()
                ),
                &marker,
                "remove or rename one of the two",
            )
        }
        LoadError::TopLevelMustBeMapping(marker) | LoadError::TopLevelMustBeSequence(marker) => {
            located(
                "malformed_yaml",
                "the document must be a mapping".to_owned(),
                marker,
                "a pipeline is a mapping with `name` and `tasks`",
            )
        }
        LoadError::UnexpectedAnchor(marker) => located(
            "malformed_yaml",
            "anchors and aliases (`&name`, `*name`) are not supported".to_owned(),
            marker,
            "write the value out in full",
        ),
        LoadError::UnexpectedTag(marker) => located(
            "malformed_yaml",
            "tags (`!name`, `!!str`) are not supported".to_owned(),
            marker,
            "remove the tag; quote the value to keep it a string",
        ),
        LoadError::MappingKeyMustBeScalar(marker) => located(
            "malformed_yaml",
            "mapping keys must be plain text".to_owned(),
            marker,
            "use a text key",
        ),
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn marker_position(marker: Option<&marked_yaml::Marker>) -> Option<(u32, u32)> {
    marker.map(|m| (to_u32(m.line()), to_u32(m.column())))
}

/// Converts a node, recording positions under `pointer`. `Err` holds the pointer at which
/// [`DEPTH_MAX`] was passed.
fn convert(
    node: &Node,
    pointer: String,
    depth: usize,
    map: &mut SourceMap,
) -> Result<Value, String> {
    if depth > DEPTH_MAX {
        return Err(pointer);
    }
    match node {
        Node::Scalar(scalar) => {
            // An empty value (`key:` and nothing) is placed by the parser at the next token;
            // its key's position, recorded by the caller, is the better answer.
            if !(scalar.as_str().is_empty() && scalar.may_coerce()) {
                if let Some(position) = marker_position(scalar.span().start()) {
                    map.values.insert(pointer, position);
                }
            }
            Ok(scalar_value(scalar.as_str(), scalar.may_coerce()))
        }
        Node::Sequence(sequence) => {
            if let Some(position) = marker_position(sequence.span().start()) {
                map.values.insert(pointer.clone(), position);
            }
            let mut items = Vec::with_capacity(sequence.len());
            for (index, item) in sequence.iter().enumerate() {
                items.push(convert(item, format!("{pointer}/{index}"), depth + 1, map)?);
            }
            Ok(Value::Array(items))
        }
        Node::Mapping(mapping) => {
            // A block mapping's start marker sits after its first key; the first key is where
            // a reader sees the mapping begin.
            let first_key = mapping
                .iter()
                .next()
                .and_then(|(key, _)| marker_position(key.span().start()));
            if let Some(position) = first_key.or_else(|| marker_position(mapping.span().start())) {
                map.values.insert(pointer.clone(), position);
            }
            let mut out = Map::with_capacity(mapping.len());
            for (key, value) in mapping.iter() {
                let child = pointer_push(&pointer, key.as_str());
                if let Some(position) = marker_position(key.span().start()) {
                    map.keys.insert(child.clone(), position);
                }
                out.insert(
                    key.as_str().to_owned(),
                    convert(value, child, depth + 1, map)?,
                );
            }
            Ok(Value::Object(out))
        }
    }
}

/// Types a scalar: quoted scalars are strings, plain ones follow the YAML 1.2 core schema.
/// `.inf` and `.nan` have no JSON form and stay strings.
fn scalar_value(text: &str, plain: bool) -> Value {
    if !plain {
        return Value::String(text.to_owned());
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Some(number) = core_schema_number(text) {
        return Value::Number(number);
    }
    Value::String(text.to_owned())
}

/// A number in the YAML 1.2 core schema's forms: `[-+]?[0-9]+`, `0o[0-7]+`, `0x[0-9a-fA-F]+`
/// and `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`. Integers too large for 64 bits
/// become floats.
fn core_schema_number(text: &str) -> Option<Number> {
    if let Some(octal) = text.strip_prefix("0o") {
        return u64::from_str_radix(octal, 8).ok().map(Number::from);
    }
    if let Some(hex) = text.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok().map(Number::from);
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(unsigned) {
        if let Ok(n) = text.parse::<i64>() {
            return Some(Number::from(n));
        }
        if let Ok(n) = unsigned.parse::<u64>() {
            if !text.starts_with('-') {
                return Some(Number::from(n));
            }
        }
    }
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], Some(&unsigned[at + 1..])),
        None => (unsigned, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => {
            (whole.is_empty() && digits(fraction))
                || (digits(whole) && (fraction.is_empty() || digits(fraction)))
        }
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['-', '+']).unwrap_or(e)));
    if !(mantissa_ok && exponent_ok) {
        return None;
    }
    text.parse::<f64>().ok().and_then(Number::from_f64)
}

/// A definition read as far as it could be, with the problems met on the way.
///
/// Tasks and params that could not be read are left out of `def`, but their names are kept
/// so that validation does not report references to them as unknown as well.
#[derive(Debug)]
pub(crate) struct Reading {
    /// The definition; its name is a placeholder when the real one could not be read.
    pub def: PipelineDef,
    /// For each task of `def`, its index in the document's `tasks`.
    pub task_sources: Vec<usize>,
    /// Ids of tasks that could not be read.
    pub unreadable_tasks: BTreeSet<String>,
    /// Names of params that could not be read.
    pub unreadable_params: BTreeSet<String>,
    /// Whether `tasks` is a list; when it is missing or something else, that is reported
    /// already and an empty task list says nothing more.
    pub tasks_listed: bool,
    /// Problems found while reading.
    pub diagnostics: Vec<Diagnostic>,
}

/// Parses a pipeline definition from YAML or JSON text.
///
/// # Errors
/// Every problem found, sorted by position: those of [`parse_document`], and per field or
/// task `unknown_field` (with the allowed fields and a "did you mean"), `missing_field`,
/// `invalid_task_id`, `invalid_name`, `invalid_type`, `invalid_value`, `invalid_retry` and
/// `invalid_timeout`. Checks that need the tools or the DAG are
/// [`crate::pipeline::validate::validate`]'s.
pub fn parse_pipeline(file: &str, text: &str) -> Result<(PipelineDef, SourceMap), Vec<Diagnostic>> {
    let (value, map) = parse_document(file, text)?;
    let mut reading = read_pipeline(file, &value, &map);
    if reading.diagnostics.is_empty() {
        // The reading above mirrors the serde model; deserializing the whole value once more
        // makes sure nothing it accepted is something the model refuses.
        match serde_path_to_error::deserialize::<_, PipelineDef>(&value) {
            Ok(def) => return Ok((def, map)),
            Err(err) => reading
                .diagnostics
                .push(serde_diagnostic(file, &map, "", err)),
        }
    }
    sort_diagnostics(&mut reading.diagnostics);
    Err(reading.diagnostics)
}

/// Reads a definition from a parsed document, collecting every problem instead of stopping
/// at the first.
pub(crate) fn read_pipeline(file: &str, value: &Value, map: &SourceMap) -> Reading {
    let mut diagnostics = Vec::new();
    let empty = Map::new();
    let top = match value {
        Value::Object(top) => top,
        _ => {
            diagnostics.push(diagnostic(
                "invalid_type",
                "the document must be a mapping".to_owned(),
                file,
                Some(map),
                "",
                Some("a pipeline is a mapping with `name` and `tasks`".to_owned()),
            ));
            &empty
        }
    };
    let mut fields = FieldReader {
        file,
        map,
        diagnostics: &mut diagnostics,
    };
    fields.unknown_fields(top, "", PIPELINE_FIELDS, "a pipeline");
    let name = match top.get("name") {
        None => {
            fields.missing(
                "",
                "name",
                "a pipeline",
                "add `name: my-pipeline` at the top",
            );
            None
        }
        Some(Value::String(text)) => match PipelineName::parse(text.clone()) {
            Ok(name) => Some(name),
            Err(err) => {
                fields.push(diagnostic(
                    "invalid_name",
                    err.to_string(),
                    file,
                    Some(map),
                    "/name",
                    Some("pipeline names use 1 to 128 characters from a-z, A-Z, 0-9, '_' and '-', starting with a letter or '_'".to_owned()),
                ));
                None
            }
        },
        Some(other) => {
            fields.invalid_type("/name", other, "a string");
            None
        }
    };
    let description: Option<String> = fields.field(top, "", "description");
    let concurrency: Option<u32> = fields.field(top, "", "concurrency");

    let mut params = BTreeMap::new();
    let mut unreadable_params = BTreeSet::new();
    match top.get("params") {
        None => {}
        Some(Value::Object(declared)) => {
            for (name, param) in declared {
                let pointer = pointer_push("/params", name);
                match fields.element::<ParamDef>(
                    param,
                    &pointer,
                    PARAM_FIELDS,
                    &["type"],
                    "a param",
                ) {
                    Some(def) => {
                        params.insert(name.clone(), def);
                    }
                    None => {
                        unreadable_params.insert(name.clone());
                    }
                }
            }
        }
        Some(other) => {
            fields.invalid_type("/params", other, "a mapping of param names to declarations")
        }
    }

    let mut tasks = Vec::new();
    let mut task_sources = Vec::new();
    let mut unreadable_tasks = BTreeSet::new();
    match top.get("tasks") {
        None => fields.missing("", "tasks", "a pipeline", "add a `tasks` list"),
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                match fields.task(item, index) {
                    Some(task) => {
                        tasks.push(task);
                        task_sources.push(index);
                    }
                    None => {
                        if let Some(Value::String(id)) = item.get("id") {
                            unreadable_tasks.insert(id.clone());
                        }
                    }
                }
            }
        }
        Some(other) => fields.invalid_type("/tasks", other, "a list of tasks"),
    }

    let placeholder = || PipelineName::parse("unnamed").expect("a valid placeholder name");
    Reading {
        def: PipelineDef {
            name: name.unwrap_or_else(placeholder),
            description,
            params,
            concurrency,
            tasks,
        },
        task_sources,
        unreadable_tasks,
        unreadable_params,
        tasks_listed: matches!(top.get("tasks"), Some(Value::Array(_))),
        diagnostics,
    }
}

/// Reads fields and elements, pushing a diagnostic for each problem.
struct FieldReader<'a> {
    file: &'a str,
    map: &'a SourceMap,
    diagnostics: &'a mut Vec<Diagnostic>,
}

impl FieldReader<'_> {
    fn push(&mut self, diagnostic: Diagnostic) {
        self.diagnostics.push(diagnostic);
    }

    fn missing(&mut self, pointer: &str, field: &str, what: &str, hint: &str) {
        let message = format!("{what} needs a `{field}` field");
        let diagnostic = diagnostic(
            "missing_field",
            message,
            self.file,
            Some(self.map),
            pointer,
            Some(hint.to_owned()),
        );
        self.push(diagnostic);
    }

    fn invalid_type(&mut self, pointer: &str, value: &Value, expected: &str) {
        let message = format!("expected {expected}, got {}", describe(value));
        self.push(diagnostic(
            "invalid_type",
            message,
            self.file,
            Some(self.map),
            pointer,
            None,
        ));
    }

    /// Reports every key of `object` that is not in `allowed`.
    fn unknown_fields(
        &mut self,
        object: &Map<String, Value>,
        pointer: &str,
        allowed: &[&str],
        what: &str,
    ) {
        for key in object.keys().filter(|k| !allowed.contains(&k.as_str())) {
            self.push(unknown_field(
                self.file,
                self.map,
                &pointer_push(pointer, key),
                key,
                allowed,
                what,
            ));
        }
    }

    /// Reads an optional field of `object`; `None` when absent or broken (and reported).
    fn field<T: DeserializeOwned>(
        &mut self,
        object: &Map<String, Value>,
        pointer: &str,
        name: &str,
    ) -> Option<T> {
        let value = object.get(name)?;
        let pointer = pointer_push(pointer, name);
        match serde_path_to_error::deserialize::<_, Option<T>>(value) {
            Ok(value) => value,
            Err(err) => {
                let diagnostic = serde_diagnostic(self.file, self.map, &pointer, err);
                self.push(diagnostic);
                None
            }
        }
    }

    /// Reads one mapping element (a param or a task) as `T`, reporting unknown and missing
    /// fields first, then every field that does not deserialize: each failing field is
    /// reported and dropped, and the rest read again, so one bad field hides no other.
    fn element<T: DeserializeOwned>(
        &mut self,
        value: &Value,
        pointer: &str,
        allowed: &[&str],
        required: &[&str],
        what: &str,
    ) -> Option<T> {
        let Value::Object(object) = value else {
            let expected = format!("{what} (a mapping)");
            self.invalid_type(pointer, value, &expected);
            return None;
        };
        self.unknown_fields(object, pointer, allowed, what);
        let mut object: Map<String, Value> = object
            .iter()
            .filter(|(k, _)| allowed.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut complete = true;
        for field in required {
            if !object.contains_key(*field) {
                let hint = format!("add `{field}:` to {what}");
                self.missing(pointer, field, what, &hint);
                complete = false;
            }
        }
        // Each round drops one field, so this ends after at most `allowed.len()` rounds.
        for _ in 0..=allowed.len() {
            let candidate = Value::Object(object.clone());
            match serde_path_to_error::deserialize::<_, T>(&candidate) {
                Ok(out) => return complete.then_some(out),
                Err(err) => {
                    let field = match err.path().iter().next() {
                        Some(serde_path_to_error::Segment::Map { key }) => Some(key.clone()),
                        _ => None,
                    };
                    let missing = err.inner().to_string().starts_with("missing field");
                    if missing && !complete {
                        // Already reported above.
                        return None;
                    }
                    let diagnostic = serde_diagnostic(self.file, self.map, pointer, err);
                    self.push(diagnostic);
                    match field.filter(|f| object.contains_key(f)) {
                        Some(field) => {
                            if required.contains(&field.as_str()) {
                                complete = false;
                            }
                            object.remove(&field);
                        }
                        None => return None,
                    }
                }
            }
        }
        None
    }

    /// Reads one task. The id and each `depends_on` entry are checked here, so that every
    /// invalid id is reported with its own position.
    fn task(&mut self, value: &Value, index: usize) -> Option<TaskDef> {
        let pointer = format!("/tasks/{index}");
        let mut value = value.clone();
        let mut id_ok = true;
        if let Value::Object(object) = &mut value {
            if let Some(Value::String(id)) = object.get("id") {
                if let Err(err) = TaskId::parse(id.clone()) {
                    self.push(invalid_task_id(
                        self.file,
                        self.map,
                        &format!("{pointer}/id"),
                        &err.to_string(),
                    ));
                    // A valid stand-in lets the other fields be checked; the task is dropped.
                    object.insert("id".to_owned(), Value::String("_".to_owned()));
                    id_ok = false;
                }
            }
            if let Some(Value::Array(dependencies)) = object.get_mut("depends_on") {
                let mut kept = Vec::with_capacity(dependencies.len());
                for (position, dependency) in dependencies.iter().enumerate() {
                    let dependency_pointer = format!("{pointer}/depends_on/{position}");
                    match dependency {
                        Value::String(id) => match TaskId::parse(id.clone()) {
                            Ok(_) => kept.push(dependency.clone()),
                            Err(err) => self.push(invalid_task_id(
                                self.file,
                                self.map,
                                &dependency_pointer,
                                &err.to_string(),
                            )),
                        },
                        other => self.invalid_type(&dependency_pointer, other, "a task id"),
                    }
                }
                *dependencies = kept;
            }
        }
        let task =
            self.element::<TaskDef>(&value, &pointer, TASK_FIELDS, &["id", "tool"], "a task");
        task.filter(|_| id_ok)
    }
}

fn invalid_task_id(file: &str, map: &SourceMap, pointer: &str, message: &str) -> Diagnostic {
    diagnostic(
        "invalid_task_id",
        message.to_owned(),
        file,
        Some(map),
        pointer,
        Some("task ids use 1 to 128 characters from a-z, A-Z, 0-9, '_' and '-', starting with a letter or '_'".to_owned()),
    )
}

fn unknown_field(
    file: &str,
    map: &SourceMap,
    pointer: &str,
    field: &str,
    allowed: &[&str],
    what: &str,
) -> Diagnostic {
    let listed = allowed
        .iter()
        .map(|f| format!("`{f}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let hint = match closest(field, allowed.iter().copied()) {
        Some(best) => format!("did you mean `{best}`? {what} takes {listed}"),
        None => format!("{what} takes {listed}"),
    };
    key_diagnostic(
        "unknown_field",
        format!("unknown field `{field}` in {what}"),
        file,
        Some(map),
        pointer,
        Some(hint),
    )
}

/// A short description of a value's kind for messages.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) => format!("a string ({s:?})"),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}

/// Turns a serde error met at `base` into a diagnostic with the full pointer and a code
/// chosen from the field and the message.
fn serde_diagnostic(
    file: &str,
    map: &SourceMap,
    base: &str,
    err: serde_path_to_error::Error<serde_json::Error>,
) -> Diagnostic {
    let mut pointer = base.to_owned();
    let mut first_field: Option<String> = None;
    for segment in err.path().iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => {
                pointer = pointer_push(&pointer, &index.to_string())
            }
            serde_path_to_error::Segment::Map { key } => {
                first_field.get_or_insert_with(|| key.clone());
                pointer = pointer_push(&pointer, key);
            }
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    let message = err.into_inner().to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let allowed: Vec<&str> = expected_names(rest);
        if !pointer.ends_with(&pointer_push("", field)) {
            pointer = pointer_push(&pointer, field);
        }
        let what = match first_field.as_deref() {
            Some("retry") => "a retry policy",
            _ => "this mapping",
        };
        return unknown_field(file, map, &pointer, field, &allowed, what);
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let variant = rest.split('`').next().unwrap_or_default();
        let allowed = expected_names(rest);
        let hint = suggestion(variant, &allowed, "allowed values");
        return diagnostic(
            "invalid_value",
            format!("unknown value `{variant}`"),
            file,
            Some(map),
            &pointer,
            Some(hint),
        );
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let hint = format!("add `{field}:`");
        return diagnostic(
            "missing_field",
            format!("missing field `{field}`"),
            file,
            Some(map),
            &pointer,
            Some(hint),
        );
    }
    if message.starts_with("invalid task id") {
        return invalid_task_id(file, map, &pointer, &message);
    }
    let code = match first_field.as_deref() {
        Some("retry") => "invalid_retry",
        Some("timeout") => "invalid_timeout",
        _ if message.starts_with("invalid type") => "invalid_type",
        _ => "invalid_value",
    };
    let hint = match first_field.as_deref() {
        _ if message.starts_with("invalid type") && message.contains("expected a string") => {
            Some("quote the value (`'...'`) to keep it text".to_owned())
        }
        Some("timeout") => Some(
            "write a duration such as \"30s\", \"500ms\" or \"1h30m\", or a number of seconds"
                .to_owned(),
        ),
        Some("retry") => Some(
            "a retry policy takes max_attempts, initial_delay, max_delay, multiplier and jitter"
                .to_owned(),
        ),
        _ => None,
    };
    diagnostic(code, message, file, Some(map), &pointer, hint)
}

/// The names serde lists after "expected one of" (or "expected"), in backticks.
fn expected_names(message: &str) -> Vec<&str> {
    let Some(at) = message.find("expected") else {
        return Vec::new();
    };
    message[at..].split('`').skip(1).step_by(2).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn codes(diagnostics: &[Diagnostic]) -> Vec<(&'static str, Option<u32>, Option<u32>, &str)> {
        diagnostics
            .iter()
            .map(|d| (d.code, d.line, d.column, d.pointer.as_str()))
            .collect()
    }

    #[test]
    fn plain_scalars_follow_the_core_schema_and_quoted_ones_stay_strings() {
        let text = "a: 1\nb: '1'\nc: true\nd: \"true\"\ne: ~\nf:\ng: 1.5e3\nh: -7\ni: .5\nj: 0x1F\nk: yes\nl: .inf\nm: 18446744073709551615\n";
        let (value, _) = parse_document("p.yaml", text).unwrap();
        assert_eq!(
            value,
            json!({"a": 1, "b": "1", "c": true, "d": "true", "e": null, "f": null, "g": 1500.0,
                   "h": -7, "i": 0.5, "j": 31, "k": "yes", "l": ".inf", "m": 18446744073709551615u64})
        );
    }

    #[test]
    fn positions_are_recorded_for_values_and_keys() {
        let text =
            "name: p\ntasks:\n  - id: a\n    tool: sql\n    depends_on: [b, 'c']\n    empty:\n";
        let (_, map) = parse_document("p.yaml", text).unwrap();
        assert_eq!(map.locate("/tasks/0/tool"), Some((4, 11)));
        assert_eq!(map.locate_key("/tasks/0/tool"), Some((4, 5)));
        assert_eq!(map.locate("/tasks/0/depends_on/1"), Some((5, 21)));
        assert_eq!(map.locate("/tasks/0"), Some((3, 5)));
        assert_eq!(map.locate("/tasks/0/empty"), Some((6, 5)));
        // A pointer below any value falls back to its nearest ancestor.
        assert_eq!(map.locate("/tasks/0/depends_on/1/deeper"), Some((5, 21)));
        assert_eq!(map.locate("/nothing/here"), Some((1, 1)));
    }

    #[test]
    fn pointers_escape_tilde_and_slash() {
        assert_eq!(pointer_push("/with", "a/b~c"), "/with/a~1b~0c");
        let (_, map) = parse_document("p.yaml", "with:\n  a/b~c: 1\n").unwrap();
        assert_eq!(map.locate("/with/a~1b~0c"), Some((2, 10)));
    }

    #[test]
    fn malformed_yaml_is_one_diagnostic_with_line_column_and_hint() {
        let err = parse_document("p.yaml", "name: p\ntasks:\n  - id: a\n   tool: x\n").unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].code, "malformed_yaml");
        assert_eq!((err[0].line, err[0].column), (Some(4), Some(8)));
        assert!(err[0].hint.is_some());
        assert!(
            err[0]
                .to_string()
                .starts_with("p.yaml:4:8: error[malformed_yaml]"),
            "{}",
            err[0]
        );
    }

    #[test]
    fn a_key_written_twice_is_refused_at_its_second_place() {
        let err = parse_document("p.yaml", "name: p\nname: q\n").unwrap_err();
        assert_eq!(codes(&err), [("duplicate_key", Some(2), Some(1), "")]);
        assert!(err[0].message.contains("line 1"), "{}", err[0].message);
    }

    #[test]
    fn anchors_and_tags_are_refused() {
        assert_eq!(
            parse_document("p.yaml", "a: &x 1\nb: *x\n").unwrap_err()[0].code,
            "malformed_yaml"
        );
        assert_eq!(
            parse_document("p.yaml", "a: !!str 1\n").unwrap_err()[0].code,
            "malformed_yaml"
        );
    }

    #[test]
    fn json_input_reads_with_positions() {
        let text = "{\n\t\"name\": \"p\",\n\t\"tasks\": [{\"id\": \"a\", \"tool\": \"sql\", \"with\": {\"n\": 1.5}}]\n}";
        let (def, map) = parse_pipeline("p.json", text).unwrap();
        assert_eq!(def.tasks[0].inputs["n"], json!(1.5));
        assert_eq!(map.locate("/tasks/0/tool"), Some((3, 32)));
    }

    #[test]
    fn malformed_json_reports_the_json_error_with_line_and_column() {
        let err =
            parse_document("p.json", "{\n  \"name\": \"p\",\n  \"tasks\": [}\n}").unwrap_err();
        assert_eq!(codes(&err), [("malformed_json", Some(3), Some(13), "")]);
        assert!(
            err[0].message.starts_with("malformed JSON: expected value"),
            "{}",
            err[0].message
        );
    }

    #[test]
    fn an_unknown_field_is_located_at_its_key_with_did_you_mean() {
        let text = "name: p\ntasks:\n  - id: a\n    tool: sql\n    depends-on:\n      - b\n";
        let err = parse_pipeline("p.yaml", text).unwrap_err();
        assert_eq!(
            codes(&err),
            [("unknown_field", Some(5), Some(5), "/tasks/0/depends-on")]
        );
        let hint = err[0].hint.as_deref().unwrap();
        assert!(hint.starts_with("did you mean `depends_on`?"), "{hint}");
        assert!(hint.contains("`for_each`"), "{hint}");
    }

    #[test]
    fn every_broken_task_and_field_is_reported_not_only_the_first() {
        let text = "\
name: p
colour: red
params:
  year: {type: integr}
tasks:
  - id: 2fast
    tool: sql
  - id: b
    tool: sql
    depends_on: [ok, 9lives, 'x y']
    timeout: soon
    retry: {max_attempt: 3}
  - tool: sql
";
        let err = parse_pipeline("p.yaml", text).unwrap_err();
        assert_eq!(
            codes(&err),
            [
                ("unknown_field", Some(2), Some(1), "/colour"),
                ("invalid_value", Some(4), Some(16), "/params/year/type"),
                ("invalid_task_id", Some(6), Some(9), "/tasks/0/id"),
                (
                    "invalid_task_id",
                    Some(10),
                    Some(22),
                    "/tasks/1/depends_on/1"
                ),
                (
                    "invalid_task_id",
                    Some(10),
                    Some(30),
                    "/tasks/1/depends_on/2"
                ),
                ("invalid_timeout", Some(11), Some(14), "/tasks/1/timeout"),
                (
                    "unknown_field",
                    Some(12),
                    Some(13),
                    "/tasks/1/retry/max_attempt"
                ),
                ("missing_field", Some(13), Some(5), "/tasks/2"),
            ]
        );
        assert_eq!(err[1].hint.as_deref(), Some("did you mean `integer`?"));
        assert!(err[6]
            .hint
            .as_deref()
            .unwrap()
            .starts_with("did you mean `max_attempts`?"));
    }

    #[test]
    fn a_valid_pipeline_reads_into_the_model() {
        let text = "\
name: penguins
params:
  year: {type: integer, default: 2008}
tasks:
  - id: load
    tool: sql
    with: {query: 'select 1'}
    timeout: 30s
  - id: report
    tool: llm
    depends_on: [load]
    if: params.year > 2000
";
        let (def, _) = parse_pipeline("p.yaml", text).unwrap();
        assert_eq!(def.name.as_str(), "penguins");
        assert_eq!(def.tasks.len(), 2);
        assert_eq!(
            def.tasks[0].timeout,
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            def.tasks[1].condition.as_deref(),
            Some("params.year > 2000")
        );
        assert_eq!(def.params["year"].default, Some(json!(2008)));
    }

    #[test]
    fn close_names_are_suggested_and_far_ones_are_not() {
        assert_eq!(
            closest("depends-on", TASK_FIELDS.iter().copied()),
            Some("depends_on")
        );
        assert_eq!(closest("Tool", TASK_FIELDS.iter().copied()), Some("tool"));
        assert_eq!(closest("zzzzzz", TASK_FIELDS.iter().copied()), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
