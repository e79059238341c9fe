use idem_runtime::idempotent;

struct Service;

impl Service {
    #[idempotent]
    async fn create(&self, body: String) -> String {
        body
    }
}

fn main() {
    let _ = Service::create;
}
