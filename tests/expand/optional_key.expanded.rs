use axum::extract::Path;
use idem_runtime::idempotent;
/// The key is optional: without one the request runs normally.
pub async fn update(
    idem_arg0: Path<u64>,
    idem_arg1: ::idem_runtime::__private::Idempotent<String>,
) -> ::idem_runtime::__private::Response {
    #[allow(clippy::unused_async)]
    async fn update(Path(id): Path<u64>, body: String) -> String {
        id.to_string() + &body
    }
    static IDEM_ROUTE: ::idem_runtime::__private::RouteConfig = ::idem_runtime::__private::RouteConfig::new(
        "update",
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
    let idem_scope = ::idem_runtime::__private::Scope::NONE;
    ::idem_runtime::__private::execute(
            idem_arg1,
            &IDEM_ROUTE,
            idem_scope,
            move |idem_arg1| update(idem_arg0, idem_arg1),
        )
        .await
}
async fn ping(
    idem_arg0: ::idem_runtime::__private::Idempotent<()>,
) -> ::idem_runtime::__private::Response {
    #[allow(clippy::unused_async)]
    async fn ping() -> &'static str {
        "pong"
    }
    static IDEM_ROUTE: ::idem_runtime::__private::RouteConfig = ::idem_runtime::__private::RouteConfig::new(
            "ping",
        )
        .lease(::idem_runtime::__private::Duration::from_secs(45))
        .wait(::idem_runtime::__private::Duration::from_secs(5))
        .store(::idem_runtime::__private::StorePolicy::Success)
        .store_body(false);
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
    let idem_scope = ::idem_runtime::__private::Scope::NONE;
    ::idem_runtime::__private::execute(
            idem_arg0,
            &IDEM_ROUTE,
            idem_scope,
            move |()| ping(),
        )
        .await
}
fn main() {}
