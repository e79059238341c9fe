//! The payments this process holds: bounded, oldest dropped first, listed a page at a time.
//!
//! Each payment gets a sequence number when it is created. The ledger keeps at most `capacity`
//! payments across all users; storing one more drops the oldest, whoever owns it. A user's
//! payments are listed oldest first from a cursor (the id of the last payment the client saw),
//! which is found through its sequence number, so a page costs `O(log n + limit)`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use super::{Payment, Refund};

/// The payments of every user, at most `capacity` of them.
#[derive(Debug)]
pub(super) struct Ledger {
    capacity: usize,
    next_sequence: u64,
    /// Every payment held, by sequence number (creation order).
    entries: BTreeMap<u64, Entry>,
    /// Sequence number by payment id.
    sequences: HashMap<String, u64>,
    /// Each user's sequence numbers. A user with no payment left has no entry.
    by_user: HashMap<Arc<str>, BTreeSet<u64>>,
}

#[derive(Debug)]
struct Entry {
    owner: Arc<str>,
    payment: Payment,
    /// The payment's refunds, oldest first.
    refunds: Vec<Refund>,
}

/// Why a refund was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RefundError {
    /// Not one of the user's payments held by the ledger.
    UnknownPayment,
    /// The refunds would add up to more than the payment; `left` may still be refunded.
    ExceedsPayment { left: u64 },
}

/// The cursor of a listing is not one of the user's payments held by the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct UnknownCursor;

impl Ledger {
    /// An empty ledger that holds at most `capacity` payments (at least one).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            next_sequence: 0,
            entries: BTreeMap::new(),
            sequences: HashMap::new(),
            by_user: HashMap::new(),
        }
    }

    /// How many payments are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Stores `payment` for `owner`, dropping the oldest payment when the ledger is full.
    pub(super) fn insert(&mut self, owner: &str, payment: Payment) {
        while self.entries.len() >= self.capacity {
            self.drop_oldest();
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let owner = match self.by_user.get_key_value(owner) {
            Some((owner, _)) => Arc::clone(owner),
            None => Arc::from(owner),
        };
        self.by_user
            .entry(Arc::clone(&owner))
            .or_default()
            .insert(sequence);
        self.sequences.insert(payment.id.clone(), sequence);
        self.entries.insert(
            sequence,
            Entry {
                owner,
                payment,
                refunds: Vec::new(),
            },
        );
    }

    fn drop_oldest(&mut self) {
        let Some((sequence, entry)) = self.entries.pop_first() else {
            return;
        };
        self.sequences.remove(&entry.payment.id);
        if let Some(sequences) = self.by_user.get_mut(&entry.owner) {
            sequences.remove(&sequence);
            if sequences.is_empty() {
                self.by_user.remove(&entry.owner);
            }
        }
    }

    /// `owner`'s payment `id`, if held (another user's payment is not found either).
    pub(super) fn get(&self, owner: &str, id: &str) -> Option<&Payment> {
        self.entry(owner, id).map(|entry| &entry.payment)
    }

    /// [`Ledger::get`], to change.
    pub(super) fn get_mut(&mut self, owner: &str, id: &str) -> Option<&mut Payment> {
        let sequence = self.sequence_of(owner, id)?;
        self.entries
            .get_mut(&sequence)
            .map(|entry| &mut entry.payment)
    }

    /// Refunds `amount` of `owner`'s payment `id`, as `refund` says, unless the payment's refunds
    /// would then add up to more than it.
    pub(super) fn refund(
        &mut self,
        owner: &str,
        id: &str,
        refund: impl FnOnce() -> Refund,
    ) -> Result<Refund, RefundError> {
        let sequence = self
            .sequence_of(owner, id)
            .ok_or(RefundError::UnknownPayment)?;
        let entry = self
            .entries
            .get_mut(&sequence)
            .ok_or(RefundError::UnknownPayment)?;
        let refunded: u64 = entry.refunds.iter().map(|refund| refund.amount).sum();
        let left = entry.payment.amount.saturating_sub(refunded);
        let refund = refund();
        if refund.amount > left {
            return Err(RefundError::ExceedsPayment { left });
        }
        entry.refunds.push(refund.clone());
        Ok(refund)
    }

    /// The refunds of `owner`'s payment `id`, oldest first.
    pub(super) fn refunds(&self, owner: &str, id: &str) -> Option<&[Refund]> {
        self.entry(owner, id).map(|entry| entry.refunds.as_slice())
    }

    fn entry(&self, owner: &str, id: &str) -> Option<&Entry> {
        self.sequence_of(owner, id)
            .and_then(|sequence| self.entries.get(&sequence))
    }

    fn sequence_of(&self, owner: &str, id: &str) -> Option<u64> {
        let sequence = *self.sequences.get(id)?;
        let entry = self.entries.get(&sequence)?;
        (*entry.owner == *owner).then_some(sequence)
    }

    /// Up to `limit` of `owner`'s payments, oldest first, starting after the payment
    /// `starting_after` (from the first when `None`).
    pub(super) fn page(
        &self,
        owner: &str,
        starting_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Payment>, UnknownCursor> {
        let from = match starting_after {
            None => Bound::Unbounded,
            Some(id) => Bound::Excluded(self.sequence_of(owner, id).ok_or(UnknownCursor)?),
        };
        let Some(sequences) = self.by_user.get(owner) else {
            return Ok(Vec::new());
        };
        Ok(sequences
            .range((from, Bound::Unbounded))
            .take(limit)
            .filter_map(|sequence| self.entries.get(sequence))
            .map(|entry| entry.payment.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment(id: &str) -> Payment {
        Payment {
            id: id.to_owned(),
            amount: 1,
            currency: "EUR".to_owned(),
            status: "succeeded".to_owned(),
            description: None,
        }
    }

    fn ids(page: &[Payment]) -> Vec<&str> {
        page.iter().map(|payment| payment.id.as_str()).collect()
    }

    #[test]
    fn pages_follow_the_cursor_oldest_first_per_user() {
        let mut ledger = Ledger::new(100);
        for n in 0..5 {
            ledger.insert("ann", payment(&format!("a{n}")));
            ledger.insert("bob", payment(&format!("b{n}")));
        }
        assert_eq!(ids(&ledger.page("ann", None, 2).unwrap()), ["a0", "a1"]);
        assert_eq!(
            ids(&ledger.page("ann", Some("a1"), 2).unwrap()),
            ["a2", "a3"]
        );
        assert_eq!(ids(&ledger.page("ann", Some("a3"), 2).unwrap()), ["a4"]);
        assert!(ledger.page("ann", Some("a4"), 2).unwrap().is_empty());
        assert_eq!(ledger.page("ann", Some("b1"), 2), Err(UnknownCursor));
        assert_eq!(ledger.page("ann", Some("nope"), 2), Err(UnknownCursor));
        assert!(ledger.page("carol", None, 2).unwrap().is_empty());
        assert_eq!(ledger.page("carol", Some("a1"), 2), Err(UnknownCursor));
    }

    #[test]
    fn refunds_never_add_up_to_more_than_their_payment() {
        let mut ledger = Ledger::new(10);
        ledger.insert(
            "ann",
            Payment {
                amount: 100,
                ..payment("p1")
            },
        );
        let refund = |amount| {
            move || Refund {
                id: format!("re_{amount}"),
                payment_id: "p1".to_owned(),
                amount,
            }
        };
        assert_eq!(
            ledger.refund("ann", "p1", refund(60)).map(|r| r.amount),
            Ok(60)
        );
        assert_eq!(
            ledger.refund("ann", "p1", refund(41)),
            Err(RefundError::ExceedsPayment { left: 40 })
        );
        assert_eq!(
            ledger.refund("ann", "p1", refund(40)).map(|r| r.amount),
            Ok(40)
        );
        assert_eq!(
            ledger.refund("bob", "p1", refund(1)),
            Err(RefundError::UnknownPayment)
        );
        let amounts: Vec<u64> = ledger
            .refunds("ann", "p1")
            .unwrap()
            .iter()
            .map(|r| r.amount)
            .collect();
        assert_eq!(amounts, [60, 40]);
        assert!(ledger.refunds("bob", "p1").is_none());
    }

    #[test]
    fn a_full_ledger_drops_the_oldest_payment_whoever_owns_it() {
        let mut ledger = Ledger::new(3);
        ledger.insert("ann", payment("a0"));
        ledger.insert("bob", payment("b0"));
        ledger.insert("ann", payment("a1"));
        ledger.insert("bob", payment("b1"));
        assert_eq!(ledger.len(), 3);
        assert!(ledger.get("ann", "a0").is_none());
        assert_eq!(ids(&ledger.page("ann", None, 10).unwrap()), ["a1"]);
        ledger.insert("bob", payment("b2"));
        // ann's last payment went too: nothing of hers is left, not even an empty index entry.
        ledger.insert("bob", payment("b3"));
        assert_eq!(ledger.len(), 3);
        assert!(ledger.page("ann", None, 10).unwrap().is_empty());
        assert!(!ledger.by_user.contains_key("ann"));
        assert_eq!(ledger.sequences.len(), 3);
        assert_eq!(
            ids(&ledger.page("bob", None, 10).unwrap()),
            ["b1", "b2", "b3"]
        );
        assert!(ledger.get_mut("bob", "b0").is_none());
        assert!(ledger.get_mut("ann", "b3").is_none(), "another user's");
        assert!(ledger.get_mut("bob", "b3").is_some());
    }
}
