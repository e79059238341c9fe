//! Turns the tokens inside `#[idempotent(...)]` into typed values, each with the span of its key.
//!
//! Every value is checked here, where its literal is at hand, so each error lands on the offending token.
//! Rules that relate an argument to the handler's signature live in `validate.rs`.

use proc_macro2::{Span, TokenStream};
use syn::ext::IdentExt as _;
use syn::parse::{Parse, ParseStream, Parser as _};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Lit, LitStr, Token};

use crate::duration;
use crate::errors::Errors;

/// An argument of the attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
    Required,
    Ttl,
    Scope,
    Lease,
    Wait,
    Store,
    StoreBody,
    ReportOnly,
    Crate,
}

/// Every argument the attribute accepts, in the order the manual documents them, with its spelling
/// and a plausible value for messages that spell out the fix. The one place an argument is named:
/// the runtime's `RouteConfig` setter of an argument has the same name (`scope` and `crate` have
/// none).
const KEYS: [(Key, &str, &str); 9] = [
    (Key::Required, "required", "true"),
    (Key::Ttl, "ttl", "\"24h\""),
    (Key::Scope, "scope", "user_id"),
    (Key::Lease, "lease", "\"30s\""),
    (Key::Wait, "wait", "\"5s\""),
    (Key::Store, "store", "\"non-5xx\""),
    (Key::StoreBody, "store_body", "false"),
    (Key::ReportOnly, "report_only", "true"),
    (Key::Crate, "crate", "\"::idem_runtime\""),
];

impl Key {
    fn from_name(name: &str) -> Option<Self> {
        KEYS.iter()
            .find(|(_, spelling, _)| *spelling == name)
            .map(|&(key, _, _)| key)
    }

    fn entry(self) -> &'static (Key, &'static str, &'static str) {
        // Every variant has its row; the table's test checks it.
        KEYS.iter()
            .find(|(key, _, _)| *key == self)
            .unwrap_or(&KEYS[0])
    }

    /// The argument as the user writes it.
    pub(crate) fn name(self) -> &'static str {
        self.entry().1
    }

    /// A plausible value, as the user would write it.
    fn example(self) -> &'static str {
        self.entry().2
    }
}

/// A value written in the attribute, with the span of the key that introduced it.
pub(crate) struct Arg<T> {
    pub(crate) key: Span,
    pub(crate) value: T,
}

/// Which responses the runtime records (`store = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StorePolicy {
    /// `"non-5xx"`: everything except server errors.
    NonServerError,
    /// `"2xx"`: successes only.
    Success,
    /// `"all"`: every response, 5xx included.
    All,
}

impl StorePolicy {
    /// The accepted spellings, as the user writes them.
    const SPELLINGS: [(&'static str, Self); 3] = [
        ("non-5xx", Self::NonServerError),
        ("2xx", Self::Success),
        ("all", Self::All),
    ];

    /// The name of the matching `StorePolicy` variant in the runtime.
    pub(crate) fn variant(self) -> &'static str {
        match self {
            Self::NonServerError => "NonServerError",
            Self::Success => "Success",
            Self::All => "All",
        }
    }
}

/// The parsed attribute. Arguments the user did not write are `None`; defaults live in the runtime.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) required: Option<Arg<bool>>,
    /// Seconds.
    pub(crate) ttl: Option<Arg<u64>>,
    pub(crate) scope: Option<Arg<Ident>>,
    /// Seconds.
    pub(crate) lease: Option<Arg<u64>>,
    /// Seconds.
    pub(crate) wait: Option<Arg<u64>>,
    pub(crate) store: Option<Arg<StorePolicy>>,
    pub(crate) store_body: Option<Arg<bool>>,
    pub(crate) report_only: Option<Arg<bool>>,
    pub(crate) krate: Option<Arg<syn::Path>>,
}

/// One `key = value` item before its value is interpreted. The value is optional so that a bare `required`
/// gets a message saying what to write instead of a generic syntax error.
struct RawArg {
    key: Ident,
    value: Option<Expr>,
}

impl Parse for RawArg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        // `parse_any` so that the keyword `crate` is accepted as a key.
        let key = input.call(Ident::parse_any)?;
        let value = if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            Some(input.parse()?)
        } else {
            None
        };
        Ok(Self { key, value })
    }
}

/// Parses the attribute's tokens. Bad arguments are recorded in `errors` and left out of the result, so the
/// rest of the attribute and the handler are still checked.
pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> Args {
    let mut args = Args::default();
    let Some(raw) = errors.take(Punctuated::<RawArg, Token![,]>::parse_terminated.parse2(tokens))
    else {
        return args;
    };
    let mut seen: Vec<Key> = Vec::new();
    for RawArg { key: token, value } in raw {
        let name = token.unraw().to_string();
        let Some(key) = Key::from_name(&name) else {
            let names: Vec<&str> = KEYS.iter().map(|&(_, name, _)| name).collect();
            errors.push(syn::Error::new(
                token.span(),
                format!(
                    "unknown argument `{name}`: expected one of {}",
                    backticked(&names)
                ),
            ));
            continue;
        };
        if seen.contains(&key) {
            errors.push(syn::Error::new(
                token.span(),
                format!("duplicate argument `{name}`: each argument may be given once, remove one of them"),
            ));
            continue;
        }
        seen.push(key);
        let Some(value) = value else {
            errors.push(syn::Error::new(
                token.span(),
                format!("`{name}` needs a value: write `{name} = {}`", key.example()),
            ));
            continue;
        };
        if let Err(error) = args.set(key, token.span(), &value) {
            errors.push(error);
        }
    }
    args
}

impl Args {
    /// Interprets `value` as the value of `key`.
    fn set(&mut self, key: Key, span: Span, value: &Expr) -> syn::Result<()> {
        match key {
            Key::Required => self.required = keyed(span, bool_value(key, value))?,
            Key::Ttl => self.ttl = keyed(span, duration_value(key, value))?,
            Key::Scope => self.scope = keyed(span, scope_value(value))?,
            Key::Lease => self.lease = keyed(span, duration_value(key, value))?,
            Key::Wait => self.wait = keyed(span, duration_value(key, value))?,
            Key::Store => self.store = keyed(span, store_value(value))?,
            Key::StoreBody => self.store_body = keyed(span, bool_value(key, value))?,
            Key::ReportOnly => self.report_only = keyed(span, bool_value(key, value))?,
            Key::Crate => self.krate = keyed(span, crate_value(value))?,
        }
        Ok(())
    }
}

/// Attaches the key's span to a successfully read value.
fn keyed<T>(key: Span, value: syn::Result<T>) -> syn::Result<Option<Arg<T>>> {
    value.map(|value| Some(Arg { key, value }))
}

/// `a`, `b` and `c` → "`a`, `b`, `c`".
fn backticked(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn string_literal(key: Key, value: &Expr) -> syn::Result<&LitStr> {
    let (name, example) = (key.name(), key.example());
    match value {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok(lit),
        _ => Err(syn::Error::new_spanned(
            value,
            format!("`{name}` takes a string literal: write `{name} = {example}`"),
        )),
    }
}

fn bool_value(key: Key, value: &Expr) -> syn::Result<bool> {
    let name = key.name();
    match value {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Bool(lit),
            ..
        }) => Ok(lit.value),
        _ => Err(syn::Error::new_spanned(
            value,
            format!("`{name}` takes `true` or `false`: write `{name} = true` or `{name} = false`"),
        )),
    }
}

fn duration_value(key: Key, value: &Expr) -> syn::Result<u64> {
    let lit = string_literal(key, value)?;
    let text = lit.value();
    duration::parse(&text)
        .map_err(|error| syn::Error::new(lit.span(), error.message(key.name(), &text)))
}

fn scope_value(value: &Expr) -> syn::Result<Ident> {
    match value {
        Expr::Path(path) if path.qself.is_none() && path.attrs.is_empty() => {
            if let Some(ident) = path.path.get_ident() {
                return Ok(ident.clone());
            }
        }
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(lit), ..
        }) => {
            let name = lit.value();
            let fix = if syn::parse_str::<Ident>(&name).is_ok() {
                name
            } else {
                "user_id".to_owned()
            };
            return Err(syn::Error::new(
                lit.span(),
                format!("`scope` takes the name of a binding, not a string: write `scope = {fix}`"),
            ));
        }
        _ => {}
    }
    Err(syn::Error::new_spanned(
        value,
        "`scope` takes the name of one binding of the handler's parameters, e.g. `scope = user_id` \
         for a parameter `AuthUser(user_id): AuthUser`",
    ))
}

fn store_value(value: &Expr) -> syn::Result<StorePolicy> {
    let lit = string_literal(Key::Store, value)?;
    let text = lit.value();
    StorePolicy::SPELLINGS
        .iter()
        .find(|(spelling, _)| *spelling == text)
        .map(|&(_, policy)| policy)
        .ok_or_else(|| {
            syn::Error::new(
                lit.span(),
                format!(
                    "invalid `store` value `{text}`: expected `\"non-5xx\"` (the default: everything but \
                     server errors), `\"2xx\"` (successes only) or `\"all\"`"
                ),
            )
        })
}

fn crate_value(value: &Expr) -> syn::Result<syn::Path> {
    let lit = string_literal(Key::Crate, value)?;
    lit.parse_with(syn::Path::parse_mod_style).map_err(|_| {
        syn::Error::new(
            lit.span(),
            format!(
                "invalid `crate` path `{}`: expected the path to idem's runtime crate, e.g. \
                 `crate = \"::idem_runtime\"` or `crate = \"my_reexports::idem\"`",
                lit.value()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::{Args, KEYS, Key, StorePolicy, parse};
    use crate::errors::Errors;

    fn parse_ok(tokens: proc_macro2::TokenStream) -> Args {
        let mut errors = Errors::default();
        let args = parse(tokens, &mut errors);
        if let Err(error) = errors.finish() {
            panic!("unexpected error: {error}");
        }
        args
    }

    fn messages(tokens: proc_macro2::TokenStream) -> Vec<String> {
        let mut errors = Errors::default();
        parse(tokens, &mut errors);
        errors
            .finish()
            .err()
            .map(|e| e.into_iter().map(|e| e.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn every_key_has_one_row() {
        for (i, &(key, name, _)) in KEYS.iter().enumerate() {
            assert_eq!(key.name(), name);
            assert_eq!(Key::from_name(name), Some(key));
            assert!(KEYS[i + 1..].iter().all(|&(other, ..)| other != key));
        }
    }

    #[test]
    fn empty_attribute_is_all_defaults() {
        let args = parse_ok(quote!());
        assert!(args.required.is_none() && args.ttl.is_none() && args.scope.is_none());
        assert!(args.krate.is_none());
    }

    #[test]
    fn every_argument() {
        let args = parse_ok(quote!(
            required = true,
            ttl = "1h30m",
            scope = user_id,
            lease = "30s",
            wait = "5s",
            store = "2xx",
            store_body = false,
            crate = "my::idem",
        ));
        assert_eq!(args.required.map(|a| a.value), Some(true));
        assert_eq!(args.ttl.map(|a| a.value), Some(5_400));
        assert_eq!(
            args.scope.map(|a| a.value.to_string()).as_deref(),
            Some("user_id")
        );
        assert_eq!(args.lease.map(|a| a.value), Some(30));
        assert_eq!(args.wait.map(|a| a.value), Some(5));
        assert_eq!(args.store.map(|a| a.value), Some(StorePolicy::Success));
        assert_eq!(args.store_body.map(|a| a.value), Some(false));
        let krate = args.krate.map(|a| a.value);
        assert_eq!(quote!(#krate).to_string(), "my :: idem");
    }

    #[test]
    fn store_spellings() {
        for (text, policy) in [
            ("non-5xx", StorePolicy::NonServerError),
            ("all", StorePolicy::All),
        ] {
            assert_eq!(
                parse_ok(quote!(store = #text)).store.map(|a| a.value),
                Some(policy)
            );
        }
    }

    #[test]
    fn errors_are_collected() {
        let found = messages(quote!(
            tll = "1h",
            required = 1,
            required = true,
            store = "5xx",
            ttl = "0s"
        ));
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(found[0].starts_with("unknown argument `tll`: expected one of `required`, `ttl`"));
        assert_eq!(
            found[1],
            "`required` takes `true` or `false`: write `required = true` or `required = false`"
        );
        assert!(found[2].starts_with("duplicate argument `required`"));
        assert!(found[3].starts_with("invalid `store` value `5xx`"));
        assert!(found[4].starts_with("`ttl` cannot be zero"));
    }

    #[test]
    fn duplicate_detected_even_when_first_value_is_bad() {
        let found = messages(quote!(ttl = "x", ttl = "1h"));
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[1].starts_with("duplicate argument `ttl`"));
    }

    #[test]
    fn value_kinds() {
        assert_eq!(
            messages(quote!(ttl = 24)),
            ["`ttl` takes a string literal: write `ttl = \"24h\"`"]
        );
        assert_eq!(
            messages(quote!(scope = "user_id")),
            ["`scope` takes the name of a binding, not a string: write `scope = user_id`"]
        );
        assert!(
            messages(quote!(scope = a.b))[0].starts_with("`scope` takes the name of one binding")
        );
        assert!(
            messages(quote!(crate = "not a path"))[0]
                .starts_with("invalid `crate` path `not a path`")
        );
        assert!(messages(quote!(crate = "Vec<u8>"))[0].starts_with("invalid `crate` path"));
        assert_eq!(
            messages(quote!(required)),
            ["`required` needs a value: write `required = true`"]
        );
    }
}
