//! Checks the handler's signature and the rules that tie the arguments to it, and produces the [`Spec`]
//! that `expand.rs` turns into code.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::ext::IdentExt as _;
use syn::{Attribute, Block, FnArg, Ident, ItemFn, Pat, PatType, Signature, Visibility};

use crate::args::{Arg, Args, Key, StorePolicy};
use crate::bindings;
use crate::errors::Errors;

/// Everything `expand.rs` needs, already checked.
pub(crate) struct Spec {
    /// Path to the runtime crate (`::idem_runtime` unless `crate = "..."` says otherwise).
    pub(crate) krate: TokenStream,
    /// The handler's name, given to `RouteConfig::new`.
    pub(crate) route_name: String,
    /// `RouteConfig` setters for the arguments the user wrote, in a fixed order.
    pub(crate) setters: Vec<Setter>,
    pub(crate) scope: Option<Scope>,
    pub(crate) handler: Handler,
}

/// One `.method(value)` call on `RouteConfig`.
pub(crate) struct Setter {
    pub(crate) method: &'static str,
    /// The span of the argument's key, so a runtime mismatch points at the attribute.
    pub(crate) span: Span,
    pub(crate) value: SetterValue,
}

pub(crate) enum SetterValue {
    Bool(bool),
    Seconds(u64),
    Store(StorePolicy),
}

/// Where the scope value comes from.
pub(crate) struct Scope {
    /// Index of the parameter whose pattern binds it.
    pub(crate) param: usize,
    /// That parameter's pattern reduced to the scope binding (see [`bindings::extraction_pattern`]).
    pub(crate) pattern: Pat,
    /// The name as written in the attribute (its span points there).
    pub(crate) value: Ident,
}

/// The user's function, taken apart.
pub(crate) struct Handler {
    /// Attributes that describe the route function itself: docs, `cfg`, lint levels, `must_use`,
    /// `deprecated`, `utoipa::path`.
    pub(crate) outer_attrs: Vec<Attribute>,
    /// Every other attribute (e.g. `#[tracing::instrument]`); they apply to the user's code.
    pub(crate) inner_attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    /// The user's signature, unchanged; [`Handler::params`] holds its parameters.
    pub(crate) sig: Signature,
    pub(crate) params: Vec<PatType>,
    pub(crate) block: Box<Block>,
}

/// Attributes kept on the outer (route) function, by name; all others move to the inner function
/// (except those of [`OUTER_PATHS`]).
const OUTER_ATTRS: [&str; 10] = [
    "doc",
    "cfg",
    "cfg_attr",
    "allow",
    "warn",
    "deny",
    "forbid",
    "expect",
    "must_use",
    "deprecated",
];

/// Attributes kept on the outer (route) function, by path: they document the route and generate
/// items beside it that must stay reachable (`#[utoipa::path]` emits `__path_<name>`, which the
/// application's `#[derive(OpenApi)]` names; inside the route function's body it could not).
const OUTER_PATHS: [&[&str]; 1] = [&["utoipa", "path"]];

/// Whether `attr` stays on the route function.
fn is_outer(attr: &Attribute) -> bool {
    let path = attr.path();
    OUTER_ATTRS.iter().any(|name| path.is_ident(name))
        || OUTER_PATHS.iter().any(|outer| {
            path.segments.len() == outer.len()
                && path
                    .segments
                    .iter()
                    .zip(*outer)
                    .all(|(segment, name)| segment.ident == name && segment.arguments.is_none())
        })
}

/// Checks `func` and `args` together. Problems are recorded in `errors`; the returned spec is only
/// meaningful when none were.
pub(crate) fn validate(args: Args, func: ItemFn, errors: &mut Errors) -> Spec {
    check_signature(&func.sig, errors);
    let params: Vec<PatType> = func
        .sig
        .inputs
        .iter()
        .filter_map(|arg| match arg {
            FnArg::Typed(param) => Some(param.clone()),
            FnArg::Receiver(_) => None,
        })
        .collect();
    for param in &params {
        check_param_attrs(param, errors);
    }
    let setters = setters(&args);
    let scope = args
        .scope
        .and_then(|scope| find_scope(scope.value, &params, errors));
    let krate = args.krate.map_or_else(
        || quote!(::idem_runtime),
        |krate| {
            let path = krate.value;
            quote!(#path)
        },
    );
    let (outer_attrs, inner_attrs) = func.attrs.into_iter().partition(is_outer);
    Spec {
        krate,
        route_name: func.sig.ident.unraw().to_string(),
        setters,
        scope,
        handler: Handler {
            outer_attrs,
            inner_attrs,
            vis: func.vis,
            sig: func.sig,
            params,
            block: func.block,
        },
    }
}

fn check_signature(sig: &Signature, errors: &mut Errors) {
    let name = &sig.ident;
    if let Some(constness) = &sig.constness {
        errors.push(syn::Error::new_spanned(
            constness,
            "`#[idempotent]` handlers cannot be `const fn`: remove `const`",
        ));
    }
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new_spanned(
            sig.fn_token,
            format!("`#[idempotent]` handlers must be `async fn`: write `async fn {name}`"),
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.push(syn::Error::new_spanned(
            unsafety,
            "`#[idempotent]` handlers cannot be `unsafe`: remove `unsafe`",
        ));
    }
    if let Some(abi) = &sig.abi {
        errors.push(syn::Error::new_spanned(
            abi,
            "`#[idempotent]` handlers cannot declare an ABI: remove the `extern` qualifier",
        ));
    }
    if !sig.generics.params.is_empty() {
        errors.push(syn::Error::new_spanned(
            &sig.generics,
            "`#[idempotent]` does not support generic handlers: use concrete types, or call a generic function \
             from a non-generic handler",
        ));
    }
    if let Some(where_clause) = &sig.generics.where_clause {
        errors.push(syn::Error::new_spanned(
            where_clause,
            "`#[idempotent]` does not support `where` clauses: use concrete types, or call a generic function \
             from a non-generic handler",
        ));
    }
    for arg in &sig.inputs {
        if let FnArg::Receiver(receiver) = arg {
            errors.push(syn::Error::new_spanned(
                receiver,
                "`#[idempotent]` handlers cannot take `self`: make the handler a free function and reach shared \
                 data through an extractor such as `State`",
            ));
        }
    }
    if let Some(variadic) = &sig.variadic {
        errors.push(syn::Error::new_spanned(
            variadic,
            "`#[idempotent]` handlers cannot be variadic: remove the `...` parameter",
        ));
    }
}

/// `#[cfg]` on a parameter would desynchronise the positional parameters of the generated function.
fn check_param_attrs(param: &PatType, errors: &mut Errors) {
    for attr in &param.attrs {
        if attr.path().is_ident("cfg") || attr.path().is_ident("cfg_attr") {
            errors.push(syn::Error::new_spanned(
                attr,
                "`#[idempotent]` does not support `cfg` on handler parameters: write two handlers instead",
            ));
        }
    }
}

/// Finds the parameter that binds `wanted` and builds the pattern that extracts it.
fn find_scope(wanted: Ident, params: &[PatType], errors: &mut Errors) -> Option<Scope> {
    let mut available: Vec<(usize, Ident)> = Vec::new();
    let mut complete = true;
    for (index, param) in params.iter().enumerate() {
        let found = bindings::collect(&param.pat, &mut |ident| {
            available.push((index, ident.clone()));
        });
        if let Err(error) = found {
            errors.push(error);
            complete = false;
        }
    }
    let wanted_name = wanted.unraw();
    if let Some((param, binding)) = available
        .iter()
        .find(|(_, binding)| binding.unraw() == wanted_name)
    {
        return Some(Scope {
            param: *param,
            pattern: bindings::extraction_pattern(&params[*param].pat, binding),
            value: wanted,
        });
    }
    // With an unreadable pattern the binding may well be in it: that error is the one to fix first.
    if complete {
        errors.push(syn::Error::new(
            wanted.span(),
            scope_not_found(&wanted, &available, params.is_empty()),
        ));
    }
    None
}

fn scope_not_found(wanted: &Ident, available: &[(usize, Ident)], no_params: bool) -> String {
    let head = format!("`{wanted}` is not a binding of this handler's parameters");
    if no_params {
        format!(
            "{head}; the handler has no parameters: add one that binds it, e.g. `AuthUser(user_id): AuthUser`"
        )
    } else if available.is_empty() {
        format!(
            "{head}; its parameters bind no names: bind the value in a pattern, e.g. `AuthUser(user_id): AuthUser`"
        )
    } else {
        let names: Vec<String> = available
            .iter()
            .map(|(_, ident)| format!("`{ident}`"))
            .collect();
        format!("{head}; available bindings: {}", names.join(", "))
    }
}

fn setters(args: &Args) -> Vec<Setter> {
    /// The setter of an argument has the argument's name.
    fn setter<T: Copy>(
        key: Key,
        arg: Option<&Arg<T>>,
        value: fn(T) -> SetterValue,
    ) -> Option<Setter> {
        arg.map(|arg| Setter {
            method: key.name(),
            span: arg.key,
            value: value(arg.value),
        })
    }
    [
        setter(Key::Required, args.required.as_ref(), SetterValue::Bool),
        setter(Key::Ttl, args.ttl.as_ref(), SetterValue::Seconds),
        setter(Key::Lease, args.lease.as_ref(), SetterValue::Seconds),
        setter(Key::Wait, args.wait.as_ref(), SetterValue::Seconds),
        setter(Key::Store, args.store.as_ref(), SetterValue::Store),
        setter(Key::StoreBody, args.store_body.as_ref(), SetterValue::Bool),
        setter(
            Key::ReportOnly,
            args.report_only.as_ref(),
            SetterValue::Bool,
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use syn::Attribute;
    use syn::parse::Parser as _;

    use super::is_outer;

    fn attr(tokens: proc_macro2::TokenStream) -> Attribute {
        let mut attrs = Attribute::parse_outer.parse2(tokens).expect("an attribute");
        attrs.remove(0)
    }

    #[test]
    fn utoipa_path_stays_on_the_route_function() {
        use quote::quote;
        assert!(is_outer(&attr(quote!(#[utoipa::path(post, path = "/")]))));
        assert!(is_outer(&attr(quote!(#[::utoipa::path(post, path = "/")]))));
        assert!(is_outer(&attr(quote!(#[doc = "docs"]))));
        assert!(!is_outer(&attr(quote!(#[tracing::instrument]))));
        assert!(!is_outer(&attr(quote!(#[path(post)]))));
        assert!(!is_outer(&attr(quote!(#[other::utoipa::path]))));
    }
}
