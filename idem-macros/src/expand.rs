//! Emits the route function from a checked [`Spec`]; the shape is documented in `docs/EXPANSION.md`.

use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};

use crate::validate::{SetterValue, Spec};

/// The route function: positional parameters with the last one wrapped, the user's function nested
/// inside unchanged, and one call into the runtime.
pub(crate) fn expand(spec: &Spec) -> TokenStream {
    let krate = &spec.krate;
    let private = quote!(#krate::__private);
    let handler = &spec.handler;
    let mixed = Span::mixed_site();

    // Names we introduce are mixed-site so they can never collide with the user's.
    let arg_count = handler.params.len().max(1);
    let args: Vec<Ident> = (0..arg_count)
        .map(|i| format_ident!("idem_arg{}", i, span = mixed))
        .collect();
    let last = &args[arg_count - 1];
    let route = Ident::new("IDEM_ROUTE", mixed);

    let outer_params = if handler.params.is_empty() {
        quote!(#last: #private::Idempotent<()>)
    } else {
        let params = handler
            .params
            .iter()
            .zip(&args)
            .enumerate()
            .map(|(i, (param, arg))| {
                let ty = &param.ty;
                if i + 1 == arg_count {
                    quote!(#arg: #private::Idempotent<#ty>)
                } else {
                    quote!(#arg: #ty)
                }
            });
        quote!(#(#params),*)
    };
    // A handler without parameters still needs the wrapper; its `()` payload is not passed on.
    let unwrapped_last = if handler.params.is_empty() {
        quote!(())
    } else {
        quote!(#last)
    };
    let call_args = if handler.params.is_empty() {
        &args[..0]
    } else {
        &args[..]
    };

    let route_name = Literal::string(&spec.route_name);
    let setters = spec.setters.iter().map(|setter| {
        let method = Ident::new(setter.method, setter.span);
        let value = match setter.value {
            SetterValue::Bool(value) => quote!(#value),
            SetterValue::Seconds(seconds) => {
                let seconds = Literal::u64_unsuffixed(seconds);
                quote!(#private::Duration::from_secs(#seconds))
            }
            SetterValue::Store(policy) => {
                let variant = Ident::new(policy.variant(), Span::call_site());
                quote!(#private::StorePolicy::#variant)
            }
        };
        quote_spanned!(setter.span=> .#method(#value))
    });

    let name = &handler.sig.ident;
    let call = quote!(#name(#(#call_args),*));
    let run = runtime_call(spec, &private, &args, &unwrapped_last, &call);

    let outer_attrs = &handler.outer_attrs;
    let inner_attrs = &handler.inner_attrs;
    let vis = &handler.vis;
    let sig = &handler.sig;
    let asyncness = &sig.asyncness;
    let fn_token = &sig.fn_token;
    let block = &handler.block;

    quote! {
        #(#outer_attrs)*
        #vis #asyncness #fn_token #name(#outer_params) -> #private::Response {
            // The user's function is async by contract (the attribute requires it), whether or not its
            // body awaits; called directly here, clippy would otherwise flag bodies without `.await`.
            #[allow(clippy::unused_async)]
            #(#inner_attrs)*
            #sig #block
            static #route: #private::RouteConfig = #private::RouteConfig::new(#route_name) #(#setters)*;
            // Publishes the settings for the runtime's OpenAPI support; nothing without its feature.
            #private::register!(#route);
            #run
        }
    }
}

/// The scope, then the call into the runtime with `call` (the user's function called with every
/// positional argument). The wrapped extractor runs only if the handler does (a replay never parses
/// the body), unless the scope comes out of it: then it runs first.
fn runtime_call(
    spec: &Spec,
    private: &TokenStream,
    args: &[Ident],
    unwrapped_last: &TokenStream,
    call: &TokenStream,
) -> TokenStream {
    let mixed = Span::mixed_site();
    let request = Ident::new("idem_request", mixed);
    let scope = Ident::new("idem_scope", mixed);
    let route = Ident::new("IDEM_ROUTE", mixed);
    let last = &args[args.len() - 1];

    let scope_value = if let Some(found) = &spec.scope {
        let pattern = &found.pattern;
        let arg = &args[found.param];
        let value = &found.value;
        // The call carries the span of `scope = <name>`, so a missing `Display` impl is reported there.
        let call = quote_spanned!(value.span()=> #private::scope(#value));
        quote!({
            let #pattern = &#arg;
            #call
        })
    } else {
        quote!(#private::Scope::NONE)
    };
    let scope_from_last = spec
        .scope
        .as_ref()
        .is_some_and(|found| !spec.handler.params.is_empty() && found.param + 1 == args.len());

    if scope_from_last {
        let extracted = Ident::new("idem_extracted", mixed);
        let rejection = Ident::new("idem_rejection", mixed);
        quote! {
            let (#request, #last) = match #private::Idempotent::extract(#last).await {
                ::core::result::Result::Ok(#extracted) => #extracted,
                ::core::result::Result::Err(#rejection) => return #rejection,
            };
            let #scope = #scope_value;
            #private::execute_extracted(#request, &#route, #scope, #call).await
        }
    } else {
        quote! {
            let #scope = #scope_value;
            #private::execute(#last, &#route, #scope, move |#unwrapped_last| #call).await
        }
    }
}
