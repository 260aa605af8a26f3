//! The secrets agent's contract, shared by the webhook (which refuses bad annotations at
//! admission) and the agent (which checks again before writing anything): the names of
//! the files it may write and the engine paths it can render.

/// A file name the agent may create in its folder, and nowhere else (S4): one path
/// component, no `..`, not absolute, not hidden (the agent's own temporary files start
/// with a dot), of the characters Kubernetes allows in an annotation name.
pub fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the file name is empty".into());
    }
    if name.len() > 200 {
        return Err("the file name is longer than 200 bytes".into());
    }
    if name.contains('/') || name.contains('\\') {
        return Err(
            "a file name cannot contain '/' or '\\': files are only written into the secrets folder".into(),
        );
    }
    if name.contains("..") {
        return Err("a file name cannot contain '..'".into());
    }
    if name.starts_with('.') {
        return Err("a file name cannot start with '.'".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("a file name may hold only letters, digits, '-', '_' and '.'".into());
    }
    Ok(())
}

/// What an agent path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentPathKind {
    /// KV version 2: `<mount>/data/<key>`.
    Kv,
    /// A dynamic database credential: `<mount>/creds/<role>`.
    Database,
}

/// The kind of an engine path the agent can render, or why it cannot.
pub fn agent_path_kind(path: &str) -> Result<AgentPathKind, String> {
    let segments: Vec<&str> = path.split('/').collect();
    for segment in &segments {
        if segment.is_empty() || *segment == "." || *segment == ".." {
            return Err(format!("path {path:?} has an empty, '.' or '..' segment"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'+' | b'='))
        {
            return Err(format!(
                "path {path:?}: segment {segment:?} holds a character other than letters, digits and -_.@+="
            ));
        }
    }
    match segments.as_slice() {
        [_, "data", _, ..] => Ok(AgentPathKind::Kv),
        [_, "creds", _] => Ok(AgentPathKind::Database),
        _ => Err(format!(
            "path {path:?} is of an unknown kind: neither a KV v2 secret (<mount>/data/<key>) nor a \
             database credential (<mount>/creds/<role>)"
        )),
    }
}
