//! The HCL2 front end: parses with hcl-edit (which keeps every item's byte span, so each
//! block and attribute knows its line, and bounds nesting so deep input cannot overflow
//! the stack), evaluates each attribute with hcl-rs against the jobspec's `variable`s
//! (defaults, then `--var`), `locals` and [`functions`](crate::functions), and yields the
//! `job` block as a [`tree::Block`].
//!
//! Nomad leaves its runtime interpolations for the client to fill in (`${NOMAD_PORT_http}`,
//! `${node.datacenter}`, `${attr.kernel.name}`, `${meta.rack}`): any reference whose root
//! is not `var` or `local` is such a one, and evaluates to itself, `${...}` verbatim.

use crate::functions;
use crate::tree::{Attr, Block};
use crate::{Error, Result, Untranslated};
use hcl::edit::Span;
use hcl::edit::expr::{
    BinaryOperator, Expression, FuncArgs, FuncCall, Null, TraversalOperator, UnaryOperator,
};
use hcl::edit::structure::{self, BlockLabel, Structure};
use hcl::edit::visit::{self, Visit};
use hcl::edit::visit_mut::{self, VisitMut};
use hcl::eval::{Context, ErrorKind, Evaluate};
use std::collections::{BTreeMap, BTreeSet};

/// How deeply `${...}` may nest in strings (`"a${"b${c}"}"` is 2). hcl-edit's parser
/// backtracks through nested interpolations in time exponential in their depth when the
/// strings do not close (found by fuzzing: 1 KiB took seconds past a depth of 20), and
/// a jobspec needs two or three at most.
const INTERPOLATION_DEPTH: usize = 16;

/// A value larger than this (bytes of text, roughly) is refused: locals that double a
/// string or list each time would otherwise grow without bound.
const VALUE_LIMIT: usize = 1 << 20;

/// What the HCL front end read: the job block, and what it already knows it cannot
/// translate (top-level blocks other than job, variable and locals; calls to functions
/// it does not have).
pub struct Read {
    pub job: Block,
    pub untranslated: Vec<Untranslated>,
}

pub fn read(source: &str, vars: &BTreeMap<String, String>) -> Result<Read> {
    interpolation_depth(source)?;
    let body = hcl::edit::parser::parse_body(source).map_err(|e| Error::Syntax {
        line: e.location().line(),
        column: e.location().column(),
        message: e.message().to_owned(),
    })?;
    let reader = Reader {
        source,
        lines: source.match_indices('\n').map(|(i, _)| i).collect(),
    };
    let mut untranslated = Vec::new();
    let mut declared: Vec<(&structure::Block, String)> = Vec::new();
    let mut locals: Vec<&structure::Attribute> = Vec::new();
    let mut shorthand: Vec<&structure::Attribute> = Vec::new();
    let mut job = None;
    for item in body.iter() {
        match item {
            Structure::Block(b) if b.ident.as_str() == "variable" => {
                declared.push((b, label(b).unwrap_or_default()));
            }
            Structure::Block(b) if b.ident.as_str() == "variables" => shorthand.extend(b.body.attributes()),
            Structure::Block(b) if b.ident.as_str() == "locals" => locals.extend(b.body.attributes()),
            Structure::Block(b) if b.ident.as_str() == "job" => {
                if job.is_some() {
                    return Err(reader.invalid(b.span(), "job", "a jobspec has one job block"));
                }
                job = Some(b);
            }
            Structure::Block(b) => untranslated.push(Untranslated {
                block: b.ident.to_string(),
                line: reader.line(b.span()),
                reason: "not part of a job".into(),
            }),
            Structure::Attribute(a) => untranslated.push(Untranslated {
                block: a.key.to_string(),
                line: reader.line(a.span()),
                reason: "not part of a job".into(),
            }),
        }
    }
    let Some(job) = job else {
        return Err(Error::Invalid {
            block: "job".into(),
            line: 0,
            message: "no job block".into(),
        });
    };

    let mut ctx = Context::new();
    functions::declare(&mut ctx);
    let variables = reader.variables(&ctx, &declared, &shorthand, vars)?;
    ctx.declare_var("var", hcl::Value::Object(variables));
    let locals = reader.locals(&ctx, &locals)?;
    ctx.declare_var("local", hcl::Value::Object(locals));

    let job = reader.block(&ctx, job, "", &mut untranslated)?;
    Ok(Read { job, untranslated })
}

fn label(block: &structure::Block) -> Option<String> {
    block.labels.first().map(|l| match l {
        BlockLabel::Ident(i) => i.as_str().to_owned(),
        BlockLabel::String(s) => s.as_str().to_owned(),
    })
}

struct Reader<'s> {
    source: &'s str,
    /// Byte offsets of the newlines.
    lines: Vec<usize>,
}

/// How an attribute's evaluation failed.
enum Failed {
    /// A function the converter does not have: the attribute is left out, named.
    Unsupported(String),
    Error(String),
}

impl Reader<'_> {
    fn line(&self, span: Option<std::ops::Range<usize>>) -> usize {
        span.map_or(0, |s| self.lines.partition_point(|&nl| nl < s.start) + 1)
    }

    fn invalid(
        &self,
        span: Option<std::ops::Range<usize>>,
        block: &str,
        message: impl Into<String>,
    ) -> Error {
        Error::Invalid {
            block: block.to_owned(),
            line: self.line(span),
            message: message.into(),
        }
    }

    fn text(&self, span: Option<std::ops::Range<usize>>) -> &str {
        span.and_then(|s| self.source.get(s)).unwrap_or_default()
    }

    /// Each variable's value: `--var`, else its default. One with neither, or a `--var`
    /// for a variable the jobspec does not declare, is an error (as in Nomad).
    fn variables(
        &self,
        ctx: &Context<'_>,
        declared: &[(&structure::Block, String)],
        shorthand: &[&structure::Attribute],
        given: &BTreeMap<String, String>,
    ) -> Result<hcl::Map<String, hcl::Value>> {
        let mut values = hcl::Map::new();
        for attr in shorthand {
            let value = self
                .eval(ctx, &attr.value)
                .map_err(|e| self.failed(attr.span(), "variables", e))?;
            values.insert(attr.key.to_string(), value);
        }
        for (block, name) in declared {
            let at = format!("variable[{name}]");
            let typed = block
                .body
                .get_attribute("type")
                .is_some_and(|t| self.text(t.value.span()).trim() != "string");
            let value = match given.get(name) {
                Some(text) if typed => {
                    let expr = hcl::edit::parser::parse_expr(text).map_err(|e| {
                        self.invalid(block.span(), &at, format!("--var {name}: {}", e.message()))
                    })?;
                    self.eval(ctx, &expr)
                        .map_err(|e| self.failed(block.span(), &at, e))?
                }
                Some(text) => hcl::Value::from(text.as_str()),
                None => match block.body.get_attribute("default") {
                    Some(default) => self
                        .eval(ctx, &default.value)
                        .map_err(|e| self.failed(default.span(), &at, e))?,
                    None => {
                        return Err(self.invalid(
                            block.span(),
                            &at,
                            format!("variable {name:?} has no default: give it with --var {name}=VALUE"),
                        ));
                    }
                },
            };
            values.insert(name.clone(), value);
        }
        if let Some(unknown) = given.keys().find(|k| !values.contains_key(*k)) {
            return Err(Error::Invalid {
                block: format!("--var {unknown}"),
                line: 0,
                message: format!("the jobspec declares no variable {unknown:?}"),
            });
        }
        Ok(values)
    }

    /// Locals may refer to each other in any order: each round evaluates those whose
    /// references are all known, until none is left (or none can be: a cycle, or a
    /// reference to a local that does not exist).
    fn locals(
        &self,
        ctx: &Context<'_>,
        attrs: &[&structure::Attribute],
    ) -> Result<hcl::Map<String, hcl::Value>> {
        let mut values = hcl::Map::new();
        let mut pending: Vec<&structure::Attribute> = attrs.to_vec();
        while !pending.is_empty() {
            let before = pending.len();
            let mut waiting = Vec::new();
            for attr in pending {
                let needs = references(&attr.value, "local");
                if needs.iter().all(|n| values.contains_key(n)) {
                    let mut scope = ctx.clone();
                    scope.declare_var("local", hcl::Value::Object(values.clone()));
                    let value = self
                        .eval(&scope, &attr.value)
                        .map_err(|e| self.failed(attr.span(), &format!("locals.{}", attr.key.as_str()), e))?;
                    values.insert(attr.key.to_string(), value);
                } else {
                    waiting.push(attr);
                }
            }
            if waiting.len() == before {
                let attr = waiting[0];
                let missing: Vec<String> = references(&attr.value, "local")
                    .into_iter()
                    .filter(|n| !values.contains_key(n))
                    .collect();
                return Err(self.invalid(
                    attr.span(),
                    &format!("locals.{}", attr.key.as_str()),
                    format!(
                        "refers to local.{}, which is not defined or refers back to it",
                        missing.join(", local.")
                    ),
                ));
            }
            pending = waiting;
        }
        Ok(values)
    }

    /// A variable's or local's evaluation failure: an error either way (an unsupported
    /// function there would make every attribute that uses the value wrong).
    fn failed(&self, span: Option<std::ops::Range<usize>>, block: &str, failed: Failed) -> Error {
        match failed {
            Failed::Unsupported(message) | Failed::Error(message) => self.invalid(span, block, message),
        }
    }

    /// Evaluates an expression, Nomad's runtime interpolations kept as written.
    fn eval(&self, ctx: &Context<'_>, expr: &Expression) -> Result<hcl::Value, Failed> {
        let mut roots = hcl::Map::new();
        for path in runtime_references(expr) {
            placeholder(&mut roots, &path);
        }
        let scoped;
        let scope = if roots.is_empty() {
            ctx
        } else {
            let mut scope = ctx.clone();
            for (root, value) in roots {
                scope.declare_var(root, value);
            }
            scoped = scope;
            &scoped
        };
        let mut guarded = expr.clone();
        Arithmetic.visit_expr_mut(&mut guarded);
        let converted: hcl::Expression = guarded.into();
        let value = converted.evaluate(scope).map_err(|e| match e.kind() {
            ErrorKind::UndefinedFunc(name) => {
                Failed::Unsupported(format!("the function {name}() is not supported"))
            }
            _ => Failed::Error(e.to_string()),
        })?;
        if size(&value, 0) > VALUE_LIMIT {
            return Err(Failed::Error(format!("a value larger than {VALUE_LIMIT} bytes")));
        }
        Ok(value)
    }

    fn block(
        &self,
        ctx: &Context<'_>,
        block: &structure::Block,
        parent: &str,
        untranslated: &mut Vec<Untranslated>,
    ) -> Result<Block> {
        let kind = block.ident.as_str().to_owned();
        let label = label(block);
        let path = match (parent, &label) {
            ("", _) => kind.clone(),
            (parent, Some(label)) => format!("{parent}.{kind}[{label}]"),
            (parent, None) => format!("{parent}.{kind}"),
        };
        let mut out = Block {
            kind,
            label,
            line: self.line(block.span()),
            attrs: Vec::new(),
            blocks: Vec::new(),
            path,
        };
        for item in block.body.iter() {
            match item {
                Structure::Attribute(attr) => {
                    let name = attr.key.as_str().to_owned();
                    let path = format!("{}.{name}", out.path);
                    let line = self.line(attr.span());
                    match self.eval(ctx, &attr.value) {
                        Ok(value) => out.attrs.push(Attr {
                            name,
                            value: serde_json::to_value(&value).map_err(|e| Error::Invalid {
                                block: path.clone(),
                                line,
                                message: e.to_string(),
                            })?,
                            path,
                            line,
                        }),
                        Err(Failed::Unsupported(reason)) => untranslated.push(Untranslated {
                            block: path,
                            line,
                            reason,
                        }),
                        Err(Failed::Error(message)) => {
                            return Err(Error::Invalid {
                                block: path,
                                line,
                                message,
                            });
                        }
                    }
                }
                Structure::Block(inner) => {
                    let inner = self.block(ctx, inner, &out.path, untranslated)?;
                    out.blocks.push(inner);
                }
            }
        }
        Ok(out)
    }
}

/// The names `root.<name>` refers to in `expr` (`local.a`, `local.b`).
fn references(expr: &Expression, root: &str) -> BTreeSet<String> {
    let mut refs = Roots::default();
    refs.visit_expr(expr);
    refs.paths
        .into_iter()
        .filter(|p| p.first().map(String::as_str) == Some(root))
        .filter_map(|p| p.get(1).cloned())
        .collect()
}

/// The references in `expr` to anything but `var` and `local`: Nomad's runtime
/// variables, as paths of names (`["node", "unique", "name"]`).
fn runtime_references(expr: &Expression) -> Vec<Vec<String>> {
    let mut refs = Roots::default();
    refs.visit_expr(expr);
    refs.paths
        .into_iter()
        .filter(|p| !matches!(p.first().map(String::as_str), Some("var" | "local")))
        .collect()
}

/// Adds `path` (`node.unique.name`) to the runtime placeholders so that it evaluates to
/// `${node.unique.name}`. Several paths may share a root (`node.datacenter`,
/// `node.unique.name`): they are merged into one object.
fn placeholder(roots: &mut hcl::Map<String, hcl::Value>, path: &[String]) {
    let Some((root, rest)) = path.split_first() else {
        return;
    };
    let verbatim = hcl::Value::from(format!("${{{}}}", path.join(".")));
    if rest.is_empty() {
        roots.entry(root.clone()).or_insert(verbatim);
        return;
    }
    let mut cursor = roots
        .entry(root.clone())
        .or_insert_with(|| hcl::Value::Object(hcl::Map::new()));
    for (i, name) in rest.iter().enumerate() {
        let Some(object) = cursor.as_object_mut() else {
            return;
        };
        let last = i + 1 == rest.len();
        cursor = object.entry(name.clone()).or_insert_with(|| {
            if last {
                verbatim.clone()
            } else {
                hcl::Value::Object(hcl::Map::new())
            }
        });
    }
}

/// Every variable reference in an expression, with the attribute names after it.
#[derive(Default)]
struct Roots {
    paths: Vec<Vec<String>>,
}

impl Visit for Roots {
    fn visit_expr(&mut self, expr: &Expression) {
        match expr {
            Expression::Variable(v) => self.paths.push(vec![v.as_str().to_owned()]),
            Expression::Traversal(t) => {
                if let Expression::Variable(v) = &t.expr {
                    let mut path = vec![v.as_str().to_owned()];
                    for op in &t.operators {
                        match op.value() {
                            TraversalOperator::GetAttr(name) => path.push(name.as_str().to_owned()),
                            _ => break,
                        }
                    }
                    self.paths.push(path);
                    for op in &t.operators {
                        self.visit_traversal_operator(op);
                    }
                } else {
                    visit::visit_traversal(self, t);
                }
            }
            _ => visit::visit_expr(self, expr),
        }
    }
}

/// A value's size in bytes of text, counted until it passes the limit.
fn size(value: &hcl::Value, so_far: usize) -> usize {
    if so_far > VALUE_LIMIT {
        return so_far;
    }
    match value {
        hcl::Value::String(s) => so_far + s.len(),
        hcl::Value::Array(items) => items.iter().fold(so_far + 2, |n, v| size(v, n + 1)),
        hcl::Value::Object(map) => map.iter().fold(so_far + 2, |n, (k, v)| size(v, n + k.len() + 2)),
        _ => so_far + 8,
    }
}

/// Rewrites arithmetic (`a + b`, `-a`, in expressions and in templates' interpolations)
/// into calls of [`functions`](crate::functions)' checked `capstan_*` functions: hcl-rs
/// computes integers with Rust's plain operators, which panic on overflow (with debug
/// assertions) or on a remainder by zero, and a jobspec is untrusted input.
struct Arithmetic;

impl VisitMut for Arithmetic {
    fn visit_expr_mut(&mut self, expr: &mut Expression) {
        visit_mut::visit_expr_mut(self, expr);
        let take = |e: &mut Expression| std::mem::replace(e, Expression::Null(Null.into()));
        let (name, args) = match expr {
            Expression::BinaryOp(op) => {
                let name = match op.operator.value() {
                    BinaryOperator::Plus => "capstan_add",
                    BinaryOperator::Minus => "capstan_sub",
                    BinaryOperator::Mul => "capstan_mul",
                    BinaryOperator::Div => "capstan_div",
                    BinaryOperator::Mod => "capstan_mod",
                    _ => return,
                };
                (name, vec![take(&mut op.lhs_expr), take(&mut op.rhs_expr)])
            }
            Expression::UnaryOp(op) if *op.operator.value() == UnaryOperator::Neg => {
                ("capstan_neg", vec![take(&mut op.expr)])
            }
            _ => return,
        };
        *expr = Expression::from(FuncCall::new(hcl::edit::Ident::new(name), FuncArgs::from(args)));
    }
}

/// Refuses input whose string interpolations nest deeper than [`INTERPOLATION_DEPTH`],
/// naming where, before the parser sees it. A lexer of HCL's strings, comments and
/// braces, enough to count: a quoted string ends at its line's end (HCL's do), heredoc
/// bodies are read as code (they only ever hold shallow interpolations).
fn interpolation_depth(source: &str) -> Result<()> {
    enum Frame {
        Quoted,
        /// Inside `${ ... }`, with the `{` opened in it still open.
        Interpolation(usize),
    }
    let mut stack: Vec<Frame> = Vec::new();
    let (mut line, mut column) = (1, 0);
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        column += 1;
        if c == '\n' {
            (line, column) = (line + 1, 0);
            stack.retain(|f| !matches!(f, Frame::Quoted));
            continue;
        }
        match stack.last_mut() {
            Some(Frame::Quoted) => match c {
                '\\' => {
                    chars.next();
                    column += 1;
                }
                '"' => {
                    stack.pop();
                }
                '$' | '%' if chars.peek() == Some(&c) => {
                    // `$${` and `%%{` are escapes, not interpolations.
                    chars.next();
                    column += 1;
                }
                '$' | '%' if chars.peek() == Some(&'{') => {
                    chars.next();
                    column += 1;
                    stack.push(Frame::Interpolation(0));
                    let depth = stack
                        .iter()
                        .filter(|f| matches!(f, Frame::Interpolation(_)))
                        .count();
                    if depth > INTERPOLATION_DEPTH {
                        return Err(Error::Syntax {
                            line,
                            column,
                            message: format!("interpolations nested more than {INTERPOLATION_DEPTH} deep"),
                        });
                    }
                }
                _ => {}
            },
            frame => match c {
                '"' => stack.push(Frame::Quoted),
                '#' => skip_line(&mut chars),
                '/' if chars.peek() == Some(&'/') => skip_line(&mut chars),
                '{' => {
                    if let Some(Frame::Interpolation(open)) = frame {
                        *open += 1;
                    }
                }
                '}' => match frame {
                    Some(Frame::Interpolation(0)) => {
                        stack.pop();
                    }
                    Some(Frame::Interpolation(open)) => *open -= 1,
                    _ => {}
                },
                _ => {}
            },
        }
    }
    Ok(())
}

/// Skips a comment to (not past) its line's end.
fn skip_line(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while chars.next_if(|&c| c != '\n').is_some() {}
}
