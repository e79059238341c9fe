mod deps {
    pub use idem_runtime as idem;
}
pub async fn create(
    idem_arg0: crate::deps::idem::__private::Idempotent<String>,
) -> crate::deps::idem::__private::Response {
    #[allow(clippy::unused_async)]
    async fn create(body: String) -> String {
        body
    }
    static IDEM_ROUTE: crate::deps::idem::__private::RouteConfig = crate::deps::idem::__private::RouteConfig::new(
            "create",
        )
        .required(true);
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
    let idem_scope = crate::deps::idem::__private::Scope::NONE;
    crate::deps::idem::__private::execute(
            idem_arg0,
            &IDEM_ROUTE,
            idem_scope,
            move |idem_arg0| create(idem_arg0),
        )
        .await
}
fn main() {}
