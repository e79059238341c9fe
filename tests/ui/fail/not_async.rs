use idem_runtime::idempotent;

#[idempotent(required = true)]
fn create(body: String) -> String {
    body
}

fn main() {
    let _ = create;
}
