//! The names a handler's parameter patterns bind, and the pattern that pulls the `scope` binding back out
//! of a parameter.

use syn::{FieldPat, Ident, Pat, PatIdent, PatWild, Token};

/// Calls `found` with every name `pat` binds, in source order.
///
/// Or-patterns and macros in patterns are rejected: a binding inside them cannot be extracted reliably.
pub(crate) fn collect(pat: &Pat, found: &mut dyn FnMut(&Ident)) -> syn::Result<()> {
    match pat {
        Pat::Ident(binding) => {
            found(&binding.ident);
            if let Some((_, sub)) = &binding.subpat {
                collect(sub, found)?;
            }
        }
        Pat::Tuple(tuple) => collect_all(tuple.elems.iter(), found)?,
        Pat::TupleStruct(tuple) => collect_all(tuple.elems.iter(), found)?,
        Pat::Slice(slice) => collect_all(slice.elems.iter(), found)?,
        Pat::Struct(strukt) => collect_all(strukt.fields.iter().map(|field| &*field.pat), found)?,
        Pat::Paren(paren) => collect(&paren.pat, found)?,
        Pat::Reference(reference) => collect(&reference.pat, found)?,
        Pat::Type(typed) => collect(&typed.pat, found)?,
        Pat::Lit(_)
        | Pat::Range(_)
        | Pat::Path(_)
        | Pat::Const(_)
        | Pat::Rest(_)
        | Pat::Wild(_) => {}
        Pat::Or(_) => {
            return Err(syn::Error::new_spanned(
                pat,
                "`#[idempotent(scope = ...)]` cannot look inside or-patterns: bind the parameter with a \
                 pattern that has no `|`",
            ));
        }
        Pat::Macro(_) => {
            return Err(syn::Error::new_spanned(
                pat,
                "`#[idempotent(scope = ...)]` cannot look inside macros in patterns: write the pattern out",
            ));
        }
        _ => {
            return Err(syn::Error::new_spanned(
                pat,
                "`#[idempotent(scope = ...)]` does not understand this pattern: bind the parameter with a \
                 plain, tuple, struct or slice pattern",
            ));
        }
    }
    Ok(())
}

fn collect_all<'a>(
    mut pats: impl Iterator<Item = &'a Pat>,
    found: &mut dyn FnMut(&Ident),
) -> syn::Result<()> {
    pats.try_for_each(|pat| collect(pat, found))
}

/// Rewrites a parameter pattern (already accepted by [`collect`]) so that, matched against a *reference*
/// to the parameter's value, it binds only `scope`, by reference:
///
/// * every other binding becomes `_` (or its `@` subpattern, which is kept),
/// * `mut`, `ref` and `ref mut` are removed (edition 2024 rejects them under a by-reference default
///   binding mode),
/// * `&` and `&mut` patterns are replaced by their inner pattern: matching through a reference then goes
///   by default binding modes, which also works where an explicit `&` would be rejected,
/// * parentheses and type ascriptions are dropped.
pub(crate) fn extraction_pattern(pat: &Pat, scope: &Ident) -> Pat {
    let map_all = |pats: &syn::punctuated::Punctuated<Pat, Token![,]>| {
        pats.iter()
            .map(|pat| extraction_pattern(pat, scope))
            .collect()
    };
    match pat {
        Pat::Ident(binding) => {
            let subpat = binding
                .subpat
                .as_ref()
                .map(|(at, sub)| (*at, Box::new(extraction_pattern(sub, scope))));
            if binding.ident == *scope {
                Pat::Ident(PatIdent {
                    attrs: Vec::new(),
                    by_ref: None,
                    mutability: None,
                    ident: binding.ident.clone(),
                    subpat,
                })
            } else if let Some((_, sub)) = subpat {
                *sub
            } else {
                wildcard()
            }
        }
        Pat::Tuple(tuple) => Pat::Tuple(syn::PatTuple {
            elems: map_all(&tuple.elems),
            ..tuple.clone()
        }),
        Pat::TupleStruct(tuple) => Pat::TupleStruct(syn::PatTupleStruct {
            elems: map_all(&tuple.elems),
            ..tuple.clone()
        }),
        Pat::Slice(slice) => Pat::Slice(syn::PatSlice {
            elems: map_all(&slice.elems),
            ..slice.clone()
        }),
        Pat::Struct(strukt) => Pat::Struct(syn::PatStruct {
            fields: strukt
                .fields
                .iter()
                .map(|field| extraction_field(field, scope))
                .collect(),
            ..strukt.clone()
        }),
        Pat::Paren(paren) => extraction_pattern(&paren.pat, scope),
        Pat::Reference(reference) => extraction_pattern(&reference.pat, scope),
        Pat::Type(typed) => extraction_pattern(&typed.pat, scope),
        other => other.clone(),
    }
}

fn extraction_field(field: &FieldPat, scope: &Ident) -> FieldPat {
    let pat = extraction_pattern(&field.pat, scope);
    // Shorthand `Struct { user_id }` stays shorthand only if the field still binds the same plain name.
    let shorthand = field.colon_token.is_none()
        && matches!(&pat, Pat::Ident(binding) if binding.subpat.is_none() && binding.ident == *scope);
    FieldPat {
        attrs: field.attrs.clone(),
        member: field.member.clone(),
        colon_token: if shorthand {
            None
        } else {
            Some(<Token![:]>::default())
        },
        pat: Box::new(pat),
    }
}

fn wildcard() -> Pat {
    Pat::Wild(PatWild {
        attrs: Vec::new(),
        underscore_token: <Token![_]>::default(),
    })
}

#[cfg(test)]
mod tests {
    use quote::ToTokens as _;
    use syn::{Ident, Pat, parse_quote};

    use super::{collect, extraction_pattern};

    fn pat(text: &str) -> Pat {
        syn::parse::Parser::parse_str(Pat::parse_single, text).expect("test pattern parses")
    }

    fn try_names(text: &str) -> syn::Result<Vec<String>> {
        let mut found = Vec::new();
        collect(&pat(text), &mut |ident| found.push(ident.to_string()))?;
        Ok(found)
    }

    fn names(text: &str) -> Vec<String> {
        try_names(text).expect("pattern is accepted")
    }

    fn rejection(text: &str) -> String {
        try_names(text)
            .expect_err("pattern is rejected")
            .to_string()
    }

    fn extract(text: &str, scope: &str) -> String {
        let scope: Ident = syn::parse_str(scope).expect("scope is an identifier");
        extraction_pattern(&pat(text), &scope)
            .to_token_stream()
            .to_string()
    }

    #[test]
    fn collects_every_kind_of_binding() {
        assert_eq!(names("user_id"), ["user_id"]);
        assert_eq!(names("mut db"), ["db"]);
        assert_eq!(names("AuthUser(user_id)"), ["user_id"]);
        assert_eq!(names("Path((org, id))"), ["org", "id"]);
        assert_eq!(
            names("whole @ Json(Order { amount, currency: c, .. })"),
            ["whole", "amount", "c"]
        );
        assert_eq!(names("[first, .., ref last]"), ["first", "last"]);
        assert_eq!(names("&(a, &mut b)"), ["a", "b"]);
        assert_eq!(names("(_, ((x)))"), ["x"]);
        assert!(names("State(_)").is_empty());
        assert!(names("markers::Unit").is_empty());
    }

    #[test]
    fn rejects_or_and_macro_patterns() {
        let or = rejection("(A(x) | B(x))");
        assert!(or.contains("cannot look inside or-patterns"), "{or}");
        let mac = rejection("m!(x)");
        assert!(mac.contains("cannot look inside macros"), "{mac}");
    }

    #[test]
    fn extraction_keeps_only_the_scope() {
        assert_eq!(extract("user_id", "user_id"), "user_id");
        assert_eq!(extract("mut user_id", "user_id"), "user_id");
        assert_eq!(
            extract("AuthUser(user_id)", "user_id"),
            "AuthUser (user_id)"
        );
        assert_eq!(extract("Path((org, mut id))", "org"), "Path ((org , _))");
        assert_eq!(
            extract("Path((ref org, ref mut id))", "id"),
            "Path ((_ , id))"
        );
        assert_eq!(
            extract("Json(Order { amount, currency, .. })", "currency"),
            "Json (Order { amount : _ , currency , .. })"
        );
        assert_eq!(
            extract("Json(Order { amount: a, currency: c })", "c"),
            "Json (Order { amount : _ , currency : c })"
        );
        assert_eq!(extract("[first, .., last]", "last"), "[_ , .. , last]");
    }

    #[test]
    fn extraction_handles_at_bindings() {
        assert_eq!(extract("all @ Auth(user_id)", "user_id"), "Auth (user_id)");
        assert_eq!(extract("all @ Auth(user_id)", "all"), "all @ Auth (_)");
    }

    #[test]
    fn extraction_removes_reference_patterns() {
        assert_eq!(extract("&user_id", "user_id"), "user_id");
        assert_eq!(extract("Wrapper(&mut (a, &b))", "b"), "Wrapper ((_ , b))");
    }

    #[test]
    fn extraction_of_other_parameters_is_all_wildcards() {
        let pattern: Pat = parse_quote!(State(db));
        let scope: Ident = parse_quote!(user_id);
        assert_eq!(
            extraction_pattern(&pattern, &scope)
                .to_token_stream()
                .to_string(),
            "State (_)"
        );
    }
}
