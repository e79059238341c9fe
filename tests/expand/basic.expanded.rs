use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use idem_runtime::idempotent;
pub async fn create_payment(
    idem_arg0: State<u64>,
    idem_arg1: ::idem_runtime::__private::Idempotent<Json<u64>>,
) -> ::idem_runtime::__private::Response {
    #[allow(clippy::unused_async)]
    async fn create_payment(
        State(ledger): State<u64>,
        Json(amount): Json<u64>,
    ) -> (StatusCode, String) {
        (StatusCode::CREATED, (ledger + amount).to_string())
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
    let idem_scope = ::idem_runtime::__private::Scope::NONE;
    ::idem_runtime::__private::execute(
            idem_arg1,
            &IDEM_ROUTE,
            idem_scope,
            move |idem_arg1| create_payment(idem_arg0, idem_arg1),
        )
        .await
}
fn main() {}
