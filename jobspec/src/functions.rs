//! The HCL functions a jobspec may call, from the standard library Nomad's jobspec2
//! declares (go-cty's), for those that need no file system, clock or randomness: a
//! conversion reads the same for everyone. A call to any other function leaves its
//! attribute untranslated, named.

use hcl::eval::{Context, FuncArgs, FuncDef, ParamType};
use hcl::{Map, Number, Value};

/// Declares every function in `ctx`.
pub fn declare(ctx: &mut Context<'_>) {
    use ParamType::{Any, Number as Num, String as Str};
    let list = || ParamType::array_of(Any);
    let map = || ParamType::object_of(Any);
    let fixed = |params: Vec<ParamType>, f: hcl::eval::Func| FuncDef::new(f, params);
    let variadic = |params: Vec<ParamType>, rest: ParamType, f: hcl::eval::Func| {
        FuncDef::builder().params(params).variadic_param(rest).build(f)
    };
    let defs: Vec<(&str, FuncDef)> = vec![
        (
            "upper",
            fixed(vec![Str], |a| Ok(text(&a[0]).to_uppercase().into())),
        ),
        (
            "lower",
            fixed(vec![Str], |a| Ok(text(&a[0]).to_lowercase().into())),
        ),
        ("title", fixed(vec![Str], title)),
        ("trimspace", fixed(vec![Str], |a| Ok(text(&a[0]).trim().into()))),
        (
            "chomp",
            fixed(vec![Str], |a| {
                Ok(text(&a[0]).trim_end_matches(['\r', '\n']).into())
            }),
        ),
        (
            "trim",
            fixed(vec![Str, Str], |a| {
                let cut: Vec<char> = text(&a[1]).chars().collect();
                Ok(text(&a[0]).trim_matches(cut.as_slice()).into())
            }),
        ),
        (
            "trimprefix",
            fixed(vec![Str, Str], |a| {
                let (s, p) = (text(&a[0]), text(&a[1]));
                Ok(s.strip_prefix(p.as_str()).unwrap_or(&s).into())
            }),
        ),
        (
            "trimsuffix",
            fixed(vec![Str, Str], |a| {
                let (s, p) = (text(&a[0]), text(&a[1]));
                Ok(s.strip_suffix(p.as_str()).unwrap_or(&s).into())
            }),
        ),
        (
            "replace",
            fixed(vec![Str, Str, Str], |a| {
                let (s, from) = (text(&a[0]), text(&a[1]));
                if from.is_empty() {
                    return Ok(s.into());
                }
                Ok(s.replace(from.as_str(), &text(&a[2])).into())
            }),
        ),
        ("substr", fixed(vec![Str, Num, Num], substr)),
        ("format", variadic(vec![Str], Any, format)),
        (
            "join",
            variadic(vec![Str], ParamType::array_of(Any), |a| {
                let sep = text(&a[0]);
                let parts: Vec<String> = a
                    .variadic_args()
                    .flat_map(|l| items(l).iter().map(text))
                    .collect();
                Ok(parts.join(&sep).into())
            }),
        ),
        (
            "split",
            fixed(vec![Str, Str], |a| {
                let (sep, s) = (text(&a[0]), text(&a[1]));
                if sep.is_empty() {
                    return Ok(s.chars().map(String::from).collect());
                }
                Ok(s.split(sep.as_str()).collect())
            }),
        ),
        (
            "concat",
            variadic(vec![], list(), |a| {
                Ok(a.iter().flat_map(|l| items(l).to_vec()).collect())
            }),
        ),
        (
            "flatten",
            fixed(vec![list()], |a| {
                let mut out = Vec::new();
                flatten(items(&a[0]), &mut out);
                Ok(Value::Array(out))
            }),
        ),
        (
            "compact",
            fixed(vec![list()], |a| {
                Ok(items(&a[0])
                    .iter()
                    .filter(|v| !v.is_null() && v.as_str() != Some(""))
                    .cloned()
                    .collect())
            }),
        ),
        (
            "distinct",
            fixed(vec![list()], |a| {
                let mut out: Vec<Value> = Vec::new();
                for v in items(&a[0]) {
                    if !out.contains(v) {
                        out.push(v.clone());
                    }
                }
                Ok(Value::Array(out))
            }),
        ),
        (
            "reverse",
            fixed(vec![list()], |a| Ok(items(&a[0]).iter().rev().cloned().collect())),
        ),
        (
            "contains",
            fixed(vec![list(), Any], |a| Ok(items(&a[0]).contains(&a[1]).into())),
        ),
        (
            "index",
            fixed(vec![list(), Any], |a| {
                items(&a[0])
                    .iter()
                    .position(|v| *v == a[1])
                    .map(Value::from)
                    .ok_or_else(|| "no such value".to_owned())
            }),
        ),
        (
            "element",
            fixed(vec![list(), Num], |a| {
                let list = items(&a[0]);
                let i = whole(&a[1])?;
                if list.is_empty() || i < 0 {
                    return Err("cannot take an element of an empty list or at a negative index".into());
                }
                Ok(list[usize::try_from(i).unwrap_or(usize::MAX) % list.len()].clone())
            }),
        ),
        (
            "length",
            fixed(vec![Any], |a| match &a[0] {
                Value::Array(l) => Ok(l.len().into()),
                Value::Object(m) => Ok(m.len().into()),
                Value::String(s) => Ok(s.chars().count().into()),
                other => Err(format!("length of {other}")),
            }),
        ),
        (
            "keys",
            fixed(vec![map()], |a| Ok(object(&a[0]).into_keys().collect())),
        ),
        (
            "values",
            fixed(vec![map()], |a| Ok(object(&a[0]).into_values().collect())),
        ),
        (
            "lookup",
            variadic(vec![map(), Str], Any, |a| match object(&a[0]).get(&text(&a[1])) {
                Some(v) => Ok(v.clone()),
                None => a
                    .get(2)
                    .cloned()
                    .ok_or_else(|| format!("no key {:?}", text(&a[1]))),
            }),
        ),
        (
            "merge",
            variadic(vec![], map(), |a| {
                let mut out = Map::new();
                for m in a.iter() {
                    out.extend(object(m));
                }
                Ok(Value::Object(out))
            }),
        ),
        (
            "coalesce",
            variadic(vec![], Any, |a| {
                a.iter()
                    .find(|v| !v.is_null() && v.as_str() != Some(""))
                    .cloned()
                    .ok_or_else(|| "no non-empty argument".into())
            }),
        ),
        ("min", variadic(vec![], Num, |a| extreme(&a, f64::min))),
        ("max", variadic(vec![], Num, |a| extreme(&a, f64::max))),
        (
            "abs",
            fixed(vec![Num], |a| number(a[0].as_f64().unwrap_or_default().abs())),
        ),
        (
            "ceil",
            fixed(vec![Num], |a| number(a[0].as_f64().unwrap_or_default().ceil())),
        ),
        (
            "floor",
            fixed(vec![Num], |a| number(a[0].as_f64().unwrap_or_default().floor())),
        ),
        (
            "tostring",
            fixed(vec![Any], |a| match &a[0] {
                Value::Array(_) | Value::Object(_) => Err("a collection is not a string".into()),
                v => Ok(text(v).into()),
            }),
        ),
        (
            "tonumber",
            fixed(vec![Any], |a| match &a[0] {
                Value::Number(_) => Ok(a[0].clone()),
                Value::String(s) => s
                    .trim()
                    .parse::<f64>()
                    .map_err(|e| e.to_string())
                    .and_then(number),
                other => Err(format!("{other} is not a number")),
            }),
        ),
        (
            "tobool",
            fixed(vec![Any], |a| match &a[0] {
                Value::Bool(_) => Ok(a[0].clone()),
                Value::String(s) if s == "true" || s == "false" => Ok((s == "true").into()),
                other => Err(format!("{other} is not a bool")),
            }),
        ),
        ("tolist", fixed(vec![list()], |a| Ok(a[0].clone()))),
        (
            "toset",
            fixed(vec![list()], |a| {
                let mut out: Vec<Value> = Vec::new();
                for v in items(&a[0]) {
                    if !out.contains(v) {
                        out.push(v.clone());
                    }
                }
                Ok(Value::Array(out))
            }),
        ),
        ("tomap", fixed(vec![map()], |a| Ok(a[0].clone()))),
        (
            "jsonencode",
            fixed(vec![Any], |a| {
                serde_json::to_string(&a[0])
                    .map(Value::from)
                    .map_err(|e| e.to_string())
            }),
        ),
    ];
    // What the arithmetic operators become (crate::hcl's Arithmetic): checked.
    let arithmetic: Vec<(&str, FuncDef)> = vec![
        (
            "capstan_add",
            fixed(vec![Num, Num], |a| checked(&a, i128::checked_add, |x, y| x + y)),
        ),
        (
            "capstan_sub",
            fixed(vec![Num, Num], |a| checked(&a, i128::checked_sub, |x, y| x - y)),
        ),
        (
            "capstan_mul",
            fixed(vec![Num, Num], |a| checked(&a, i128::checked_mul, |x, y| x * y)),
        ),
        (
            "capstan_mod",
            fixed(vec![Num, Num], |a| checked(&a, i128::checked_rem, |x, y| x % y)),
        ),
        (
            "capstan_div",
            fixed(vec![Num, Num], |a| {
                let (x, y) = (
                    a[0].as_f64().unwrap_or_default(),
                    a[1].as_f64().unwrap_or_default(),
                );
                if y == 0.0 {
                    return Err("division by zero".into());
                }
                number(x / y)
            }),
        ),
        (
            "capstan_neg",
            fixed(vec![Num], |a| match integer(&a[0]) {
                Some(i) => whole_value(-i),
                None => number(-a[0].as_f64().unwrap_or_default()),
            }),
        ),
    ];
    for (name, def) in defs.into_iter().chain(arithmetic) {
        ctx.declare_func(name, def);
    }
}

/// A scalar as text, as HCL converts one to a string.
pub fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn items(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// An object argument (the parameter types have checked it is one).
fn object(value: &Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

fn flatten(list: &[Value], out: &mut Vec<Value>) {
    for v in list {
        match v {
            Value::Array(inner) => flatten(inner, out),
            other => out.push(other.clone()),
        }
    }
}

fn whole(value: &Value) -> Result<i64, String> {
    value
        .as_i64()
        .ok_or_else(|| format!("{value} is not a whole number"))
}

fn number(f: f64) -> Result<Value, String> {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        #[allow(clippy::cast_possible_truncation)]
        return Ok(Value::from(f as i64));
    }
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| format!("{f} is not a number"))
}

fn extreme(args: &FuncArgs, pick: fn(f64, f64) -> f64) -> Result<Value, String> {
    let mut numbers = args.iter().filter_map(Value::as_f64);
    let first = numbers.next().ok_or("needs at least one number")?;
    number(numbers.fold(first, pick))
}

fn title(args: FuncArgs) -> Result<Value, String> {
    let mut out = String::new();
    let mut start = true;
    for c in text(&args[0]).chars() {
        if start {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        start = c.is_whitespace();
    }
    Ok(out.into())
}

fn substr(args: FuncArgs) -> Result<Value, String> {
    let chars: Vec<char> = text(&args[0]).chars().collect();
    let len = i64::try_from(chars.len()).unwrap_or(i64::MAX);
    let mut offset = whole(&args[1])?;
    if offset < 0 {
        offset += len;
    }
    let offset = offset.clamp(0, len);
    let length = whole(&args[2])?;
    let end = if length < 0 {
        len
    } else {
        offset.saturating_add(length).min(len)
    };
    let (offset, end) = (
        usize::try_from(offset).unwrap_or(0),
        usize::try_from(end).unwrap_or(0),
    );
    Ok(chars[offset..end.max(offset)].iter().collect::<String>().into())
}

/// go-cty's format: the verbs `%s`, `%d`, `%v`, `%q`, `%t`, `%f` and `%%` (widths and
/// flags are not read: they change nothing a jobspec needs).
fn format(args: FuncArgs) -> Result<Value, String> {
    let spec = text(&args[0]);
    let mut rest = args.variadic_args();
    let mut out = String::new();
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut verb = chars.next().ok_or("format: a lone % at the end")?;
        // Skip flags, width and precision: %-10s, %5.2f.
        while matches!(verb, '-' | '+' | '#' | ' ' | '0'..='9' | '.') {
            verb = chars.next().ok_or("format: an unfinished verb")?;
        }
        if verb == '%' {
            out.push('%');
            continue;
        }
        let arg = rest.next().ok_or("format: too few arguments")?;
        match verb {
            's' | 'v' | 'd' | 't' => out.push_str(&text(arg)),
            'f' => out.push_str(&format!(
                "{:.6}",
                arg.as_f64().ok_or("format: %f of a non-number")?
            )),
            'q' => out.push_str(&serde_json::to_string(&text(arg)).map_err(|e| e.to_string())?),
            other => return Err(format!("format: the verb %{other} is not supported")),
        }
    }
    Ok(out.into())
}

/// A whole number as i128 (which holds every i64 and u64), None for a fraction.
fn integer(value: &Value) -> Option<i128> {
    value
        .as_i64()
        .map(i128::from)
        .or_else(|| value.as_u64().map(i128::from))
}

fn whole_value(n: i128) -> Result<Value, String> {
    if let Ok(n) = i64::try_from(n) {
        return Ok(Value::from(n));
    }
    u64::try_from(n)
        .map(Value::from)
        .map_err(|_| format!("{n} is out of range"))
}

/// Integer arithmetic when both are whole (refused when it overflows or divides by
/// zero), floating point otherwise (refused when it is not finite).
fn checked(
    args: &FuncArgs,
    int: fn(i128, i128) -> Option<i128>,
    float: fn(f64, f64) -> f64,
) -> Result<Value, String> {
    match (integer(&args[0]), integer(&args[1])) {
        (Some(x), Some(y)) => int(x, y)
            .ok_or_else(|| "integer overflow or division by zero".to_owned())
            .and_then(whole_value),
        _ => {
            let (x, y) = (
                args[0].as_f64().unwrap_or_default(),
                args[1].as_f64().unwrap_or_default(),
            );
            let result = float(x, y);
            if result.is_finite() {
                number(result)
            } else {
                Err("the result is not a finite number".into())
            }
        }
    }
}
