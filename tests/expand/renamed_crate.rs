mod deps {
    pub use idem_runtime as idem;
}

#[deps::idem::idempotent(crate = "crate::deps::idem", required = true)]
pub async fn create(body: String) -> String {
    body
}

fn main() {}
