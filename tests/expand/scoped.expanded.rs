use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use idem_runtime::idempotent;
pub struct AuthUser(String);
impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = StatusCode;
    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let user = parts
            .headers
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        user.map(|user| AuthUser(user.to_owned())).ok_or(StatusCode::UNAUTHORIZED)
    }
}
pub async fn create_payment(
    idem_arg0: AuthUser,
    idem_arg1: State<u64>,
    idem_arg2: ::idem_runtime::__private::Idempotent<Json<u64>>,
) -> ::idem_runtime::__private::Response {
    #[allow(clippy::unused_async)]
    async fn create_payment(
        AuthUser(user_id): AuthUser,
        State(ledger): State<u64>,
        Json(amount): Json<u64>,
    ) -> Result<(StatusCode, String), StatusCode> {
        if amount == 0 {
            return Err(StatusCode::UNPROCESSABLE_ENTITY);
        }
        Ok((StatusCode::CREATED, user_id + &(ledger + amount).to_string()))
    }
    static IDEM_ROUTE: ::idem_runtime::__private::RouteConfig = ::idem_runtime::__private::RouteConfig::new(
            "create_payment",
        )
        .required(true)
        .ttl(::idem_runtime::__private::Duration::from_secs(86400));
    #[allow(non_upper_case_globals)]
    const _: () = {
        static __INVENTORY: ::inventory::Node = ::inventory::Node {
            value: &{ ::idem_runtime::__private::Registration::new(&IDEM_ROUTE) },
            next: ::inventory::__private::UnsafeCell::new(
                ::inventory::__private::Option::None,
            ),
        };
        #[link_section = ".text.startup"]
        unsafe extern "C" fn __ctor() {
            unsafe { ::inventory::ErasedNode::submit(__INVENTORY.value, &__INVENTORY) }
        }
        #[used]
        #[link_section = ".init_array"]
        static __CTOR: unsafe extern "C" fn() = __ctor;
    };
    let idem_scope = {
        let AuthUser(user_id) = &idem_arg0;
        ::idem_runtime::__private::scope(user_id)
    };
    ::idem_runtime::__private::execute(
            idem_arg2,
            &IDEM_ROUTE,
            idem_scope,
            move |idem_arg2| create_payment(idem_arg0, idem_arg1, idem_arg2),
        )
        .await
}
/// `mut` and `ref` are dropped and other bindings become `_` in the scope pattern.
pub async fn rename(
    idem_arg0: Path<(String, u64)>,
    idem_arg1: ::idem_runtime::__private::Idempotent<Json<String>>,
) -> ::idem_runtime::__private::Response {
    #[allow(clippy::unused_async)]
    async fn rename(
        Path((org, mut id)): Path<(String, u64)>,
        Json(ref name): Json<String>,
    ) -> String {
        id += 1;
        org + &id.to_string() + name
    }
    static IDEM_ROUTE: ::idem_runtime::__private::RouteConfig = ::idem_runtime::__private::RouteConfig::new(
            "rename",
        )
        .store(::idem_runtime::__private::StorePolicy::All);
    #[allow(non_upper_case_globals)]
    const _: () = {
        static __INVENTORY: ::inventory::Node = ::inventory::Node {
            value: &{ ::idem_runtime::__private::Registration::new(&IDEM_ROUTE) },
            next: ::inventory::__private::UnsafeCell::new(
                ::inventory::__private::Option::None,
            ),
        };
        #[link_section = ".text.startup"]
        unsafe extern "C" fn __ctor() {
            unsafe { ::inventory::ErasedNode::submit(__INVENTORY.value, &__INVENTORY) }
        }
        #[used]
        #[link_section = ".init_array"]
        static __CTOR: unsafe extern "C" fn() = __ctor;
    };
    let idem_scope = {
        let Path((org, _)) = &idem_arg0;
        ::idem_runtime::__private::scope(org)
    };
    ::idem_runtime::__private::execute(
            idem_arg1,
            &IDEM_ROUTE,
            idem_scope,
            move |idem_arg1| rename(idem_arg0, idem_arg1),
        )
        .await
}
/// The scope comes out of the wrapped (last) extractor, so that one runs before the lookup.
pub async fn import(
    idem_arg0: ::idem_runtime::__private::Idempotent<Json<(String, u64)>>,
) -> ::idem_runtime::__private::Response {
    #[allow(clippy::unused_async)]
    async fn import(Json((tenant, rows)): Json<(String, u64)>) -> String {
        tenant + &rows.to_string()
    }
    static IDEM_ROUTE: ::idem_runtime::__private::RouteConfig = ::idem_runtime::__private::RouteConfig::new(
        "import",
    );
    #[allow(non_upper_case_globals)]
    const _: () = {
        static __INVENTORY: ::inventory::Node = ::inventory::Node {
            value: &{ ::idem_runtime::__private::Registration::new(&IDEM_ROUTE) },
            next: ::inventory::__private::UnsafeCell::new(
                ::inventory::__private::Option::None,
            ),
        };
        #[link_section = ".text.startup"]
        unsafe extern "C" fn __ctor() {
            unsafe { ::inventory::ErasedNode::submit(__INVENTORY.value, &__INVENTORY) }
        }
        #[used]
        #[link_section = ".init_array"]
        static __CTOR: unsafe extern "C" fn() = __ctor;
    };
    let (idem_request, idem_arg0) = match ::idem_runtime::__private::Idempotent::extract(
            idem_arg0,
        )
        .await
    {
        ::core::result::Result::Ok(idem_extracted) => idem_extracted,
        ::core::result::Result::Err(idem_rejection) => return idem_rejection,
    };
    let idem_scope = {
        let Json((tenant, _)) = &idem_arg0;
        ::idem_runtime::__private::scope(tenant)
    };
    ::idem_runtime::__private::execute_extracted(
            idem_request,
            &IDEM_ROUTE,
            idem_scope,
            import(idem_arg0),
        )
        .await
}
fn main() {}
