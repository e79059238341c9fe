use axum::body::Bytes;
use idem_runtime::idempotent;

#[idempotent]
async fn create<T: From<Bytes>>(body: Bytes) -> String {
    let _ = T::from(body);
    String::new()
}

fn main() {
    let _ = create::<Bytes>;
}
