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
