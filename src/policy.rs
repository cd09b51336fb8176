//! Pure admission and eviction decisions: the arbiter's brain.
//!
//! Everything here is a function of plain data passed in by the caller: no I/O, no clock (the
//! caller passes `now`), no async. That is what lets the one invariant that matters be checked by
//! property tests without processes or time:
//!
//! **the sum of what was admitted on a device never exceeds its usable memory minus foreign use at
//! the moment of admission.**
//!
//! The arbiter feeds [`decide`] a snapshot (devices, resident models, holds), applies the
//! [`Decision`] (release the victims, reserve the footprint as a [`Hold`], load), and asks again
//! when something changes. [`pressure_victim`] and [`cap_victim`] pick single idle models for the
//! pressure relief and the resident cap. [`failure_cooldown`] says how long a model that keeps
//! failing to start waits before the next automatic try.

use std::fmt;
use std::time::Duration;

/// Milliseconds on a monotonic clock chosen by the caller.
pub type Millis = u64;

/// What the policy needs to know about one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The device index, as shown to users ("GPU 0").
    pub index: u32,
    /// Total memory minus the configured reserve.
    pub usable_mib: u64,
    /// Memory used by processes vramgate does not manage (plus used memory no process accounts for).
    pub foreign_mib: u64,
}

/// A model that holds memory on a device (loaded, or loading, or being released).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    /// The model id; victims are named by it.
    pub id: String,
    /// The device the model lives on.
    pub device: u32,
    /// What the model costs on the device.
    pub footprint_mib: u64,
    /// Higher priority models are never evicted for lower priority requests.
    pub priority: i32,
    /// Requests in flight; a model in use is never evicted.
    pub in_use: u32,
    /// A pinned model is never evicted.
    pub pinned: bool,
    /// True only for a model that is ready (not loading, not already unloading): only those can be victims.
    pub ready: bool,
    /// When the model last served a request; least recently used models go first.
    pub last_used: Millis,
    /// When the model became resident.
    pub resident_since: Millis,
    /// How long a model stays resident before it may be evicted, so loads do not thrash.
    pub min_residency: Millis,
}

/// Memory held by something that is not an evictable model: a lease (a job such as ffmpeg), or a
/// load in flight that reserved its footprint before it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// Who holds it (a lease holder, or the model whose load is in flight).
    pub holder: String,
    /// The device it is on.
    pub device: u32,
    /// How much it holds.
    pub mib: u64,
    /// An exclusive hold keeps everybody else off the device (the old process-wide GPU lock).
    pub exclusive: bool,
}

/// A request for memory: a model load or a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Who asks (a model id or a lease holder); never its own victim, and its own holds never conflict with it.
    pub requester: String,
    /// How much it needs.
    pub mib: u64,
    /// None = any device (policy picks).
    pub device: Option<u32>,
    /// Only residents of priority ≤ this may be evicted for it.
    pub priority: i32,
    /// Wants the device to itself: no other holds may be on it (resident models may stay).
    pub exclusive: bool,
}

/// What the arbiter should do with a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It fits as things are: admit on `device`.
    Admit {
        /// Where to admit it.
        device: u32,
    },
    /// Release these residents (ids) first, then admit on `device`.
    Evict {
        /// Where to admit it once the victims are gone.
        device: u32,
        /// The residents to release, in eviction order (lowest priority, least recently used first).
        victims: Vec<String>,
    },
    /// Cannot be admitted now, even after evicting every allowed victim; may fit later.
    Wait(Shortfall),
    /// Can never fit: need > usable on every candidate device (or the requested device does not exist).
    NeverFits(Shortfall),
}

impl Decision {
    /// The message to show a user for a request that was not admitted ([`Decision::Wait`] or
    /// [`Decision::NeverFits`]); `None` for an admission.
    #[must_use]
    pub fn message(&self) -> Option<String> {
        match self {
            Decision::Admit { .. } | Decision::Evict { .. } => None,
            Decision::Wait(shortfall) => Some(shortfall.describe(false)),
            Decision::NeverFits(shortfall) => Some(shortfall.describe(true)),
        }
    }
}

/// Something that holds memory on a device, as listed in a [`Shortfall`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    /// A resident model id or a hold's holder.
    pub id: String,
    /// How much it holds.
    pub mib: u64,
    /// Why it cannot be evicted for this request, e.g. "in use", "pinned", "higher priority",
    /// "min residency", "loading", "requester", "lease", "exclusive lease"; None if it could be evicted.
    pub kept_because: Option<String>,
}

/// Why a request was not admitted, with the numbers a user needs to understand it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// The device this account is for.
    pub device: u32,
    /// What the request needs.
    pub need_mib: u64,
    /// What is free for vramgate on the device right now (see [`available_mib`]).
    pub available_mib: u64,
    /// The device's usable memory (total minus reserve); 0 for a device that does not exist.
    pub usable_mib: u64,
    /// Memory used by processes vramgate does not manage.
    pub foreign_mib: u64,
    /// Every resident and hold on the device, largest first.
    pub holders: Vec<HolderInfo>,
    /// Set when an exclusive lease (holder name) blocks the device, or when an exclusive request is blocked by other holds.
    pub exclusive_conflict: Option<String>,
}

/// The reason string of a plain hold in [`HolderInfo::kept_because`].
const LEASE: &str = "lease";
/// The reason string of an exclusive hold in [`HolderInfo::kept_because`].
const EXCLUSIVE_LEASE: &str = "exclusive lease";

impl Shortfall {
    /// The account for a device that does not exist: nothing usable, nothing held.
    fn nowhere(device: u32, need_mib: u64) -> Self {
        Shortfall {
            device,
            need_mib,
            available_mib: 0,
            usable_mib: 0,
            foreign_mib: 0,
            holders: Vec::new(),
            exclusive_conflict: None,
        }
    }

    /// The user-facing message. `never_fits` selects the form for a request that can never fit
    /// ([`Decision::NeverFits`]); otherwise the "wait" form, which is also what `Display` prints.
    #[must_use]
    pub fn describe(&self, never_fits: bool) -> String {
        if never_fits {
            return self.describe_never_fits();
        }
        let mut text = format!(
            "needs {} MiB on GPU {}; {} MiB available (usable {}, foreign {})",
            self.need_mib, self.device, self.available_mib, self.usable_mib, self.foreign_mib
        );
        if !self.holders.is_empty() {
            let listed: Vec<String> = self
                .holders
                .iter()
                .map(|h| match &h.kept_because {
                    Some(reason) => format!("{} {} MiB ({reason})", h.id, h.mib),
                    None => format!("{} {} MiB", h.id, h.mib),
                })
                .collect();
            text.push_str("; held by: ");
            text.push_str(&listed.join(", "));
        }
        if let Some(holder) = &self.exclusive_conflict {
            text.push_str(&self.describe_exclusive_conflict(holder));
        }
        text
    }

    fn describe_never_fits(&self) -> String {
        if self.usable_mib == 0 {
            // Also what a request for a device that does not exist gets: usable 0 cannot tell the
            // two apart, and "0 MiB usable (total minus reserve)" alone would mislead about a typo.
            return format!(
                "GPU {} has no usable memory (no such device, or its reserve takes all of it), need at least {} MiB",
                self.device, self.need_mib
            );
        }
        format!(
            "only {} MiB usable on GPU {} (total minus reserve), need at least {} MiB",
            self.usable_mib, self.device, self.need_mib
        )
    }

    /// The exclusive-conflict suffix. Which of the two situations it is shows in the holder list:
    /// an exclusive hold by `holder` blocks everyone; a plain one only blocks an exclusive request.
    fn describe_exclusive_conflict(&self, holder: &str) -> String {
        let by_holder = |reason: &'static str| {
            self.holders.iter().filter(move |h| h.id == holder && h.kept_because.as_deref() == Some(reason))
        };
        if by_holder(EXCLUSIVE_LEASE).next().is_none() && by_holder(LEASE).next().is_some() {
            let held: u64 = by_holder(LEASE).map(|h| h.mib).fold(0, u64::saturating_add);
            return format!("; an exclusive lease needs GPU {} to itself, but {holder} holds {held} MiB", self.device);
        }
        format!("; GPU {} is held exclusively by {holder}", self.device)
    }
}

impl fmt::Display for Shortfall {
    /// The "wait" form; use [`Shortfall::describe`] or [`Decision::message`] for a request that can never fit.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(false))
    }
}

/// What is free for vramgate on `device`: usable − foreign − Σ resident footprints on it − Σ holds
/// on it, saturating at 0.
#[must_use]
pub fn available_mib(device: &DeviceState, residents: &[Resident], holds: &[Hold]) -> u64 {
    let headroom = headroom_mib(device, residents, holds);
    // Headroom is at most usable_mib, so it always fits back into a u64 once clamped at 0.
    u64::try_from(headroom.max(0)).unwrap_or(u64::MAX)
}

/// Like [`available_mib`] but signed: negative when the device is over-committed (foreign use grew
/// after admissions). Eviction must cover that overshoot too, or admitting after the eviction would
/// break the invariant; the saturated value would hide it.
fn headroom_mib(device: &DeviceState, residents: &[Resident], holds: &[Hold]) -> i128 {
    // Sums in i128 so that no input, however absurd, can overflow.
    let models: i128 = residents.iter().filter(|r| r.device == device.index).map(|r| i128::from(r.footprint_mib)).sum();
    let held: i128 = holds.iter().filter(|h| h.device == device.index).map(|h| i128::from(h.mib)).sum();
    i128::from(device.usable_mib) - i128::from(device.foreign_mib) - models - held
}

/// Whether `resident` has been resident for at least its `min_residency`.
fn past_min_residency(resident: &Resident, now: Millis) -> bool {
    now >= resident.resident_since.saturating_add(resident.min_residency)
}

/// Idle in the sense of pressure relief and the resident cap: ready, not in use, not pinned, past
/// its minimum residency. Priority is not considered here.
fn is_idle(resident: &Resident, now: Millis) -> bool {
    resident.ready && resident.in_use == 0 && !resident.pinned && past_min_residency(resident, now)
}

/// Why `resident` may not be evicted for `request`, or `None` if it may. The one place the victim
/// rules live, so the victim choice and the reasons shown to users cannot disagree.
///
/// Permanent reasons come first (pinned, higher priority), so a user reading the message learns
/// first what waiting will not change.
fn kept_because(resident: &Resident, request: &Request, now: Millis) -> Option<&'static str> {
    if resident.id == request.requester {
        Some("requester")
    } else if resident.pinned {
        Some("pinned")
    } else if resident.priority > request.priority {
        Some("higher priority")
    } else if !resident.ready {
        // Not ready covers loading and already unloading; either way it is not ours to release.
        Some("loading")
    } else if resident.in_use > 0 {
        Some("in use")
    } else if !past_min_residency(resident, now) {
        Some("min residency")
    } else {
        None
    }
}

/// The holder that keeps `request` off `device` for exclusivity reasons, if any.
///
/// An exclusive hold by someone else blocks every request; an exclusive request is blocked by any
/// hold of someone else. Resident models never conflict: they are evictable memory, not holds.
/// When several holds conflict, the largest (then the first by name) is named, so the answer does
/// not depend on the order of `holds`.
fn exclusive_conflict(device: u32, holds: &[Hold], request: &Request) -> Option<String> {
    let others = || holds.iter().filter(|h| h.device == device && h.holder != request.requester);
    let largest = |a: &&Hold, b: &&Hold| a.mib.cmp(&b.mib).then_with(|| b.holder.cmp(&a.holder));
    if let Some(hold) = others().filter(|h| h.exclusive).max_by(largest) {
        return Some(hold.holder.clone());
    }
    if request.exclusive {
        return others().max_by(largest).map(|h| h.holder.clone());
    }
    None
}

/// Every resident and hold on `device`, with why it is kept for `request`, largest first.
fn holders_on(device: u32, residents: &[Resident], holds: &[Hold], request: &Request, now: Millis) -> Vec<HolderInfo> {
    let models = residents.iter().filter(|r| r.device == device).map(|r| HolderInfo {
        id: r.id.clone(),
        mib: r.footprint_mib,
        kept_because: kept_because(r, request, now).map(str::to_owned),
    });
    let leases = holds.iter().filter(|h| h.device == device).map(|h| HolderInfo {
        id: h.holder.clone(),
        mib: h.mib,
        kept_because: Some(if h.exclusive { EXCLUSIVE_LEASE } else { LEASE }.to_owned()),
    });
    let mut holders: Vec<HolderInfo> = models.chain(leases).collect();
    // A total order, so the message does not depend on the order of the inputs.
    holders.sort_by(|a, b| {
        b.mib.cmp(&a.mib).then_with(|| a.id.cmp(&b.id)).then_with(|| a.kept_because.cmp(&b.kept_because))
    });
    holders
}

/// The policy's view of one candidate device for one request.
struct Candidate<'a> {
    device: &'a DeviceState,
    available: u64,
    headroom: i128,
    conflict: Option<String>,
}

/// A way to admit on one device by evicting.
struct EvictionPlan<'a> {
    device: u32,
    victims: Vec<&'a Resident>,
}

impl EvictionPlan<'_> {
    /// Fewest victims, then lowest sum of victim priorities, then lowest device index.
    fn rank(&self) -> (usize, i64, u32) {
        (self.victims.len(), self.victims.iter().map(|v| i64::from(v.priority)).sum(), self.device)
    }
}

/// The victims that would let `request` in on `candidate`, or `None` if even all allowed victims
/// are not enough.
///
/// Allowed victims in eviction order (priority, then least recently used, then id for a total
/// order); the shortest prefix that covers the deficit; then each victim of that prefix, from the
/// start, is dropped if the rest still covers it. The result is irreducible: removing any one
/// victim leaves the deficit uncovered (a dropped victim only lowers the total, so a victim that
/// was needed when it was walked stays needed).
fn plan_eviction<'a>(
    candidate: &Candidate<'_>,
    residents: &'a [Resident],
    request: &Request,
    now: Millis,
) -> Option<EvictionPlan<'a>> {
    let index = candidate.device.index;
    let deficit = i128::from(request.mib) - candidate.headroom;
    if deficit <= 0 {
        // Nothing to evict: such a request fits and the caller admits it before planning.
        return None;
    }
    let mut allowed: Vec<&Resident> =
        residents.iter().filter(|r| r.device == index && kept_because(r, request, now).is_none()).collect();
    allowed.sort_by(|a, b| {
        a.priority.cmp(&b.priority).then_with(|| a.last_used.cmp(&b.last_used)).then_with(|| a.id.cmp(&b.id))
    });

    let mut covered: i128 = 0;
    let mut prefix = Vec::new();
    for resident in allowed {
        if covered >= deficit {
            break;
        }
        covered += i128::from(resident.footprint_mib);
        prefix.push(resident);
    }
    if covered < deficit {
        return None;
    }
    let mut victims = Vec::with_capacity(prefix.len());
    for resident in prefix {
        let without = covered - i128::from(resident.footprint_mib);
        if without >= deficit {
            covered = without;
        } else {
            victims.push(resident);
        }
    }
    Some(EvictionPlan { device: index, victims })
}

/// Decides what to do with `request` given the devices, the resident models and the holds.
///
/// In order: a request for a device that does not exist, or bigger than the usable memory of every
/// candidate, never fits. A request that fits as things are is admitted (never made to wait or to
/// evict), on the candidate with the most available memory. Otherwise the cheapest eviction is
/// chosen (fewest victims, then lowest victim priorities, then lowest device index). Otherwise it
/// waits, with an account of the most promising device. Devices an exclusive hold (or, for an
/// exclusive request, any other hold) keeps the request off are never admitted to.
///
/// Guarantee: after `Admit`, `available_mib` was ≥ `request.mib`; after `Evict`, usable − foreign −
/// what stays committed ≥ `request.mib`.
#[must_use]
pub fn decide(
    devices: &[DeviceState],
    residents: &[Resident],
    holds: &[Hold],
    request: &Request,
    now: Millis,
) -> Decision {
    let chosen: Vec<&DeviceState> = match request.device {
        Some(wanted) => match devices.iter().find(|d| d.index == wanted) {
            Some(device) => vec![device],
            None => {
                return Decision::NeverFits(Shortfall::nowhere(wanted, request.mib));
            }
        },
        None => devices.iter().collect(),
    };
    let candidates: Vec<Candidate<'_>> = chosen
        .into_iter()
        .map(|device| Candidate {
            device,
            available: available_mib(device, residents, holds),
            headroom: headroom_mib(device, residents, holds),
            conflict: exclusive_conflict(device.index, holds, request),
        })
        .collect();

    let shortfall = |candidate: &Candidate<'_>| Shortfall {
        device: candidate.device.index,
        need_mib: request.mib,
        available_mib: candidate.available,
        usable_mib: candidate.device.usable_mib,
        foreign_mib: candidate.device.foreign_mib,
        holders: holders_on(candidate.device.index, residents, holds, request, now),
        exclusive_conflict: candidate.conflict.clone(),
    };
    // Most available memory first, ties to the lowest index.
    let roomiest = |a: &&Candidate<'_>, b: &&Candidate<'_>| {
        a.available.cmp(&b.available).then_with(|| b.device.index.cmp(&a.device.index))
    };

    let could_ever_fit: Vec<&Candidate<'_>> =
        candidates.iter().filter(|c| request.mib <= c.device.usable_mib).collect();
    // The device a Wait gives an account of: the one with the most available memory among those
    // the request could ever fit on (an account of a device it can never fit on would not help).
    let Some(best) = could_ever_fit.iter().copied().max_by(roomiest) else {
        // Report the device that comes closest; with no devices at all, an empty account.
        let largest = candidates.iter().max_by(|a, b| {
            a.device.usable_mib.cmp(&b.device.usable_mib).then_with(|| b.device.index.cmp(&a.device.index))
        });
        return Decision::NeverFits(match largest {
            Some(candidate) => Shortfall { exclusive_conflict: None, ..shortfall(candidate) },
            None => Shortfall::nowhere(0, request.mib),
        });
    };

    let open = || could_ever_fit.iter().copied().filter(|c| c.conflict.is_none());
    if let Some(fit) = open().filter(|c| request.mib <= c.available).max_by(roomiest) {
        return Decision::Admit { device: fit.device.index };
    }

    let cheapest = open().filter_map(|c| plan_eviction(c, residents, request, now)).min_by_key(EvictionPlan::rank);
    if let Some(plan) = cheapest {
        return Decision::Evict { device: plan.device, victims: plan.victims.iter().map(|v| v.id.clone()).collect() };
    }

    Decision::Wait(shortfall(best))
}

/// For pressure relief at the emergency level: the single best idle victim on `device` (idle =
/// `in_use` 0, ready, not pinned, past `min_residency`), lowest priority first, then least recently
/// used. None if there is none.
#[must_use]
pub fn pressure_victim(device: u32, residents: &[Resident], now: Millis) -> Option<String> {
    residents
        .iter()
        .filter(|r| r.device == device && is_idle(r, now))
        .min_by(|a, b| {
            a.priority.cmp(&b.priority).then_with(|| a.last_used.cmp(&b.last_used)).then_with(|| a.id.cmp(&b.id))
        })
        .map(|r| r.id.clone())
}

/// For the resident cap: the least recently used idle victim on any device (same idleness rules),
/// ignoring priority. None if none.
#[must_use]
pub fn cap_victim(residents: &[Resident], now: Millis) -> Option<String> {
    residents
        .iter()
        .filter(|r| is_idle(r, now))
        .min_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.id.cmp(&b.id)))
        .map(|r| r.id.clone())
}

/// Failed starts in a row after which a model is `failed` and waits out a cooldown.
pub const FAILURES_BEFORE_COOLDOWN: u32 = 3;
/// The cooldown after the [`FAILURES_BEFORE_COOLDOWN`]th failed start in a row.
pub const COOLDOWN_FIRST: Duration = Duration::from_secs(10);
/// The longest cooldown: each further failed start doubles it up to this.
pub const COOLDOWN_MAX: Duration = Duration::from_secs(300);

/// How long a model that failed `consecutive_failures` starts in a row waits before the next
/// automatic try: nothing before [`FAILURES_BEFORE_COOLDOWN`], then [`COOLDOWN_FIRST`] (10 s),
/// doubling with each further failure (20 s, 40 s, ...) up to [`COOLDOWN_MAX`] (5 min). Only the
/// try after a cooldown runs out can fail next, so each doubling follows one more try.
#[must_use]
pub fn failure_cooldown(consecutive_failures: u32) -> Option<Duration> {
    let beyond = consecutive_failures.checked_sub(FAILURES_BEFORE_COOLDOWN)?;
    // 2^5 × 10 s already passes the cap: bounding the exponent keeps the product from overflowing.
    let doublings = beyond.min(5);
    Some(COOLDOWN_FIRST.saturating_mul(1 << doublings).min(COOLDOWN_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    fn dev(index: u32, usable_mib: u64, foreign_mib: u64) -> DeviceState {
        DeviceState { index, usable_mib, foreign_mib }
    }

    /// A ready, idle, unpinned model of priority 0, resident since 0 with no minimum residency.
    fn res(id: &str, device: u32, footprint_mib: u64) -> Resident {
        Resident {
            id: id.to_owned(),
            device,
            footprint_mib,
            priority: 0,
            in_use: 0,
            pinned: false,
            ready: true,
            last_used: 0,
            resident_since: 0,
            min_residency: 0,
        }
    }

    fn used(mut resident: Resident, last_used: Millis) -> Resident {
        resident.last_used = last_used;
        resident
    }

    fn prio(mut resident: Resident, priority: i32) -> Resident {
        resident.priority = priority;
        resident
    }

    fn hold(holder: &str, device: u32, mib: u64, exclusive: bool) -> Hold {
        Hold { holder: holder.to_owned(), device, mib, exclusive }
    }

    fn req(requester: &str, mib: u64, device: Option<u32>, priority: i32) -> Request {
        Request { requester: requester.to_owned(), mib, device, priority, exclusive: false }
    }

    fn evict(device: u32, victims: &[&str]) -> Decision {
        Decision::Evict { device, victims: victims.iter().map(|v| (*v).to_owned()).collect() }
    }

    fn wait(decision: Decision) -> Shortfall {
        match decision {
            Decision::Wait(shortfall) => shortfall,
            other => panic!("expected Wait, got {other:?}"),
        }
    }

    fn reason(shortfall: &Shortfall, id: &str) -> Option<String> {
        shortfall.holders.iter().find(|h| h.id == id).and_then(|h| h.kept_because.clone())
    }

    #[test]
    fn available_subtracts_everything_on_the_device_and_saturates() {
        let d = dev(0, 8000, 1000);
        let residents = [res("a", 0, 2000), res("elsewhere", 1, 5000)];
        let holds = [hold("job", 0, 1500, false), hold("far", 1, 100, false)];
        assert_eq!(available_mib(&d, &residents, &holds), 3500);
        assert_eq!(available_mib(&dev(0, 1000, 900), &residents, &holds), 0);
    }

    #[test]
    fn a_request_that_fits_is_admitted_without_victims() {
        let devices = [dev(0, 8000, 1000)];
        let residents = [res("a", 0, 2000)];
        assert_eq!(decide(&devices, &residents, &[], &req("b", 5000, Some(0), 0), 0), Decision::Admit { device: 0 });
        // Exactly the available amount still fits.
        assert_eq!(decide(&devices, &residents, &[], &req("b", 5000, None, -10), 0), Decision::Admit { device: 0 });
    }

    #[test]
    fn least_recently_used_goes_first_among_equal_priority() {
        let devices = [dev(0, 8000, 0)];
        let residents =
            [used(res("recent", 0, 3000), 50), used(res("old", 0, 3000), 10), used(res("mid", 0, 2000), 30)];
        // 0 available; a 3000 MiB deficit: the oldest alone covers it.
        assert_eq!(decide(&devices, &residents, &[], &req("new", 3000, Some(0), 0), 100), evict(0, &["old"]));
        // 4000: old, then mid would be the prefix (5000), and both are needed.
        assert_eq!(decide(&devices, &residents, &[], &req("new", 4000, Some(0), 0), 100), evict(0, &["old", "mid"]));
    }

    #[test]
    fn lower_priority_goes_before_less_recently_used() {
        let devices = [dev(0, 6000, 0)];
        let residents = [prio(used(res("old-important", 0, 3000), 1), 3), prio(used(res("new-cheap", 0, 3000), 90), 1)];
        assert_eq!(decide(&devices, &residents, &[], &req("x", 3000, Some(0), 5), 100), evict(0, &["new-cheap"]));
    }

    #[test]
    fn higher_priority_residents_are_protected() {
        let devices = [dev(0, 6000, 0)];
        let residents = [prio(res("vip", 0, 4000), 10), res("small", 0, 2000)];
        let shortfall = wait(decide(&devices, &residents, &[], &req("x", 3000, Some(0), 5), 100));
        assert_eq!(reason(&shortfall, "vip").as_deref(), Some("higher priority"));
        assert_eq!(reason(&shortfall, "small"), None);
        // Equal priority is fair game.
        assert_eq!(decide(&devices, &residents, &[], &req("x", 3000, Some(0), 10), 100), evict(0, &["vip"]));
    }

    #[test]
    fn pinned_in_use_loading_and_young_models_are_never_victims() {
        let devices = [dev(0, 8000, 0)];
        let mut pinned = used(res("pinned", 0, 2000), 0);
        pinned.pinned = true;
        let mut busy = used(res("busy", 0, 2000), 0);
        busy.in_use = 1;
        let mut loading = used(res("loading", 0, 2000), 0);
        loading.ready = false;
        let mut young = used(res("young", 0, 2000), 0);
        young.resident_since = 90;
        young.min_residency = 60;
        let residents = [pinned, busy, loading, young];
        let shortfall = wait(decide(&devices, &residents, &[], &req("x", 1, Some(0), 100), 100));
        assert_eq!(reason(&shortfall, "pinned").as_deref(), Some("pinned"));
        assert_eq!(reason(&shortfall, "busy").as_deref(), Some("in use"));
        assert_eq!(reason(&shortfall, "loading").as_deref(), Some("loading"));
        assert_eq!(reason(&shortfall, "young").as_deref(), Some("min residency"));
        // Once its minimum residency is over, the young one is the only possible victim.
        assert_eq!(decide(&devices, &residents, &[], &req("x", 1, Some(0), 100), 150), evict(0, &["young"]));
    }

    #[test]
    fn the_requester_is_never_its_own_victim() {
        let devices = [dev(0, 4000, 0)];
        let residents = [res("me", 0, 4000)];
        let shortfall = wait(decide(&devices, &residents, &[], &req("me", 1000, Some(0), 0), 10));
        assert_eq!(reason(&shortfall, "me").as_deref(), Some("requester"));
    }

    #[test]
    fn minimisation_prefers_one_big_victim_over_two_small() {
        let devices = [dev(0, 4000, 0)];
        let residents =
            [used(res("small-a", 0, 500), 1), used(res("small-b", 0, 500), 2), used(res("big", 0, 3000), 3)];
        // Deficit 1500: the prefix is all three, then both small ones are dropped.
        assert_eq!(decide(&devices, &residents, &[], &req("x", 1500, Some(0), 0), 10), evict(0, &["big"]));
        // Deficit 3300: the prefix is all three; small-a is dropped first (small-b + big = 3500 still
        // covers it), after which small-b is needed.
        assert_eq!(decide(&devices, &residents, &[], &req("x", 3300, Some(0), 0), 10), evict(0, &["small-b", "big"]));
    }

    #[test]
    fn any_device_admits_where_most_is_available() {
        let devices = [dev(0, 8000, 0), dev(1, 8000, 0), dev(2, 8000, 0)];
        let residents = [res("a", 0, 4000), res("b", 1, 1000), res("c", 2, 1000)];
        // GPU 1 and 2 tie at 7000: the lowest index wins.
        assert_eq!(decide(&devices, &residents, &[], &req("x", 2000, None, 0), 0), Decision::Admit { device: 1 });
        // Filling the roomiest device exactly is still a fit: no eviction on GPU 0 for it.
        assert_eq!(decide(&devices, &residents, &[], &req("x", 7000, None, 0), 0), Decision::Admit { device: 1 });
    }

    #[test]
    fn any_device_evicts_where_fewest_victims_are_needed() {
        let devices = [dev(0, 4000, 0), dev(1, 4000, 0), dev(2, 4000, 0)];
        let residents = [
            res("a1", 0, 2000),
            res("a2", 0, 2000),
            prio(res("b", 1, 4000), 2),
            res("c1", 2, 1000),
            prio(res("c2", 2, 3000), 1),
        ];
        // GPU 0 needs two victims; GPU 1 one of priority 2; GPU 2 one (c2, after c1 is dropped) of priority 1.
        assert_eq!(decide(&devices, &residents, &[], &req("x", 3000, None, 5), 0), evict(2, &["c2"]));
    }

    #[test]
    fn an_exclusive_hold_blocks_everyone_else() {
        let devices = [dev(0, 8000, 0), dev(1, 8000, 6000)];
        let holds = [hold("ffmpeg", 0, 1000, true)];
        let shortfall = wait(decide(&devices, &[], &holds, &req("x", 100, Some(0), 0), 0));
        assert_eq!(shortfall.exclusive_conflict.as_deref(), Some("ffmpeg"));
        assert_eq!(
            shortfall.to_string(),
            "needs 100 MiB on GPU 0; 7000 MiB available (usable 8000, foreign 0); held by: ffmpeg 1000 MiB (exclusive lease); GPU 0 is held exclusively by ffmpeg"
        );
        // The holder itself may take more; another device is used when any will do.
        assert_eq!(decide(&devices, &[], &holds, &req("ffmpeg", 100, Some(0), 0), 0), Decision::Admit { device: 0 });
        assert_eq!(decide(&devices, &[], &holds, &req("x", 100, None, 0), 0), Decision::Admit { device: 1 });
        // It cannot be evicted around either.
        let residents = [res("a", 1, 2000)];
        assert_eq!(decide(&devices, &residents, &holds, &req("x", 1000, None, 0), 0), evict(1, &["a"]));
    }

    #[test]
    fn an_exclusive_request_needs_the_device_free_of_other_holds() {
        let devices = [dev(0, 8000, 0)];
        let holds = [hold("ffmpeg", 0, 2048, false), hold("small", 0, 10, false)];
        let mut request = req("render", 1000, Some(0), 0);
        request.exclusive = true;
        let shortfall = wait(decide(&devices, &[], &holds, &request, 0));
        assert_eq!(shortfall.exclusive_conflict.as_deref(), Some("ffmpeg"));
        assert!(
            shortfall.to_string().ends_with("; an exclusive lease needs GPU 0 to itself, but ffmpeg holds 2048 MiB"),
            "{shortfall}"
        );
        // Resident models may stay, and may be evicted for it.
        let residents = [res("llm", 0, 7000)];
        assert_eq!(decide(&devices, &residents, &[], &request, 0), Decision::Admit { device: 0 });
        assert_eq!(decide(&devices, &residents, &[hold("render", 0, 500, false)], &request, 0), evict(0, &["llm"]));
    }

    #[test]
    fn bigger_than_usable_never_fits() {
        let devices = [dev(0, 7680, 0), dev(1, 6000, 0)];
        let decision = decide(&devices, &[], &[], &req("x", 9000, None, 0), 0);
        let Decision::NeverFits(shortfall) = &decision else { panic!("expected NeverFits, got {decision:?}") };
        assert_eq!(shortfall.device, 0);
        assert_eq!(
            decision.message().as_deref(),
            Some("only 7680 MiB usable on GPU 0 (total minus reserve), need at least 9000 MiB")
        );
        // Foreign use does not make a request never fit: it may go away.
        let busy = [dev(0, 7680, 7000)];
        assert!(matches!(decide(&busy, &[], &[], &req("x", 7680, None, 0), 0), Decision::Wait(_)));
        // A request that fits only on a device it did not ask for still never fits.
        assert!(matches!(decide(&devices, &[], &[], &req("x", 7000, Some(1), 0), 0), Decision::NeverFits(_)));
    }

    #[test]
    fn an_unknown_device_never_fits() {
        let decision = decide(&[dev(0, 8000, 0)], &[], &[], &req("x", 1, Some(3), 0), 0);
        let Decision::NeverFits(shortfall) = &decision else { panic!("expected NeverFits, got {decision:?}") };
        assert_eq!((shortfall.device, shortfall.usable_mib, shortfall.need_mib), (3, 0, 1));
        assert_eq!(
            decision.message().as_deref(),
            Some("GPU 3 has no usable memory (no such device, or its reserve takes all of it), need at least 1 MiB")
        );
        assert!(matches!(decide(&[], &[], &[], &req("x", 1, None, 0), 0), Decision::NeverFits(_)));
    }

    #[test]
    fn wait_message_lists_holders_largest_first_with_reasons() {
        let devices = [dev(0, 7680, 1200)];
        let mut llm = res("llm", 0, 4380);
        llm.in_use = 2;
        let mut whisper = res("whisper", 0, 1500);
        whisper.pinned = true;
        let residents = [whisper, llm, res("clip", 0, 500)];
        let holds = [hold("ffmpeg", 0, 99, false)];
        let decision = decide(&devices, &residents, &holds, &req("vlm", 6144, Some(0), 0), 0);
        assert_eq!(
            decision.message().as_deref(),
            Some(
                "needs 6144 MiB on GPU 0; 1 MiB available (usable 7680, foreign 1200); held by: llm 4380 MiB (in use), \
                 whisper 1500 MiB (pinned), clip 500 MiB, ffmpeg 99 MiB (lease)"
            )
        );
    }

    #[test]
    fn message_shapes_are_stable() {
        let holders = vec![
            HolderInfo { id: "llm".into(), mib: 4380, kept_because: Some("in use".into()) },
            HolderInfo { id: "whisper".into(), mib: 1500, kept_because: Some("pinned".into()) },
        ];
        let mut shortfall = Shortfall {
            device: 0,
            need_mib: 6144,
            available_mib: 2100,
            usable_mib: 7680,
            foreign_mib: 1200,
            holders,
            exclusive_conflict: None,
        };
        assert_eq!(
            shortfall.to_string(),
            "needs 6144 MiB on GPU 0; 2100 MiB available (usable 7680, foreign 1200); held by: llm 4380 MiB (in use), whisper 1500 MiB (pinned)"
        );
        assert_eq!(
            Decision::Wait(shortfall.clone()).message(),
            Some(shortfall.to_string()),
            "Display is the wait form"
        );
        assert_eq!(
            shortfall.describe(true),
            "only 7680 MiB usable on GPU 0 (total minus reserve), need at least 6144 MiB"
        );

        shortfall.holders.push(HolderInfo { id: "ffmpeg".into(), mib: 2048, kept_because: Some("lease".into()) });
        shortfall.exclusive_conflict = Some("ffmpeg".into());
        assert!(shortfall.to_string().ends_with(
            "whisper 1500 MiB (pinned), ffmpeg 2048 MiB (lease); an exclusive lease needs GPU 0 to itself, but ffmpeg holds 2048 MiB"
        ));
        shortfall.holders =
            vec![HolderInfo { id: "ffmpeg".into(), mib: 2048, kept_because: Some("exclusive lease".into()) }];
        assert_eq!(
            shortfall.to_string(),
            "needs 6144 MiB on GPU 0; 2100 MiB available (usable 7680, foreign 1200); held by: ffmpeg 2048 MiB (exclusive lease); GPU 0 is held exclusively by ffmpeg"
        );
        // No holders: no "held by" part at all.
        shortfall.holders.clear();
        shortfall.exclusive_conflict = None;
        assert_eq!(shortfall.to_string(), "needs 6144 MiB on GPU 0; 2100 MiB available (usable 7680, foreign 1200)");
        assert_eq!(Decision::Admit { device: 0 }.message(), None);
        assert_eq!(evict(0, &["a"]).message(), None);
    }

    #[test]
    fn an_over_committed_device_evicts_enough_to_restore_the_invariant() {
        // Foreign use grew after admission: 2000 committed, only 1200 room.
        let devices = [dev(0, 4000, 2800)];
        let residents = [used(res("a", 0, 1000), 1), used(res("b", 0, 1000), 2)];
        assert_eq!(available_mib(&devices[0], &residents, &[]), 0);
        // 100 needs the 800 overshoot plus 100 covered: one victim of 1000 does it.
        assert_eq!(decide(&devices, &residents, &[], &req("x", 100, Some(0), 0), 10), evict(0, &["a"]));
        // 300 needs 1100: both.
        assert_eq!(decide(&devices, &residents, &[], &req("x", 300, Some(0), 0), 10), evict(0, &["a", "b"]));
    }

    #[test]
    fn pressure_victim_is_lowest_priority_then_least_recently_used() {
        let mut busy = prio(res("busy", 0, 100), -9);
        busy.in_use = 1;
        let residents = [
            busy,
            prio(used(res("high", 0, 100), 0), 5),
            prio(used(res("low-new", 0, 100), 50), 1),
            prio(used(res("low-old", 0, 100), 40), 1),
            prio(used(res("other-gpu", 1, 100), 0), -9),
        ];
        assert_eq!(pressure_victim(0, &residents, 100).as_deref(), Some("low-old"));
        assert_eq!(pressure_victim(1, &residents, 100).as_deref(), Some("other-gpu"));
        assert_eq!(pressure_victim(2, &residents, 100), None);
        let mut young = res("young", 3, 100);
        young.min_residency = 1000;
        assert_eq!(pressure_victim(3, &[young.clone()], 999), None);
        assert_eq!(pressure_victim(3, &[young], 1000).as_deref(), Some("young"));
    }

    #[test]
    fn cap_victim_is_least_recently_used_regardless_of_priority() {
        let mut pinned = used(res("pinned", 0, 100), 0);
        pinned.pinned = true;
        let residents = [pinned, prio(used(res("vip", 1, 100), 5), 100), prio(used(res("cheap", 0, 100), 9), -100)];
        assert_eq!(cap_victim(&residents, 10).as_deref(), Some("vip"));
        assert_eq!(cap_victim(&residents[..1], 10), None);
    }

    // ---- Property tests: random operation sequences applied to a model of the arbiter. ----

    #[derive(Debug, Clone)]
    enum Op {
        Request {
            mib: u64,
            priority: i32,
            /// None: any device; Some(Some(i)): one of the devices; Some(None): one that does not exist.
            device: Option<Option<Index>>,
            exclusive: bool,
            lease: bool,
            min_residency: Millis,
            /// Ask as an existing resident (to check it is never its own victim).
            as_resident: Option<Index>,
        },
        FinishLoad(Index),
        Release(Index),
        /// A job (a hold that is not a load in flight) ends.
        EndJob(Index),
        SetForeign {
            device: u32,
            mib: u64,
        },
        Use {
            who: Index,
            start: bool,
        },
        TogglePin(Index),
        StartUnload(Index),
        Advance(Millis),
    }

    fn op() -> impl Strategy<Value = Op> {
        let request =
            (
                // Mostly sizes that fit a device, so that evictions are common; some that never fit.
                prop_oneof![6 => 1u64..6000, 1 => 1u64..20_000],
                -5i32..=5,
                // Now and then a device that does not exist.
                prop::option::weighted(0.5, prop::option::weighted(0.95, any::<Index>())),
                prop::bool::weighted(0.1),
                prop::bool::weighted(0.15),
                prop_oneof![Just(0u64), 0u64..3000],
                prop::option::weighted(0.1, any::<Index>()),
            )
                .prop_map(|(mib, priority, device, exclusive, lease, min_residency, as_resident)| {
                    Op::Request { mib, priority, device, exclusive, lease, min_residency, as_resident }
                });
        prop_oneof![
            6 => request,
            5 => any::<Index>().prop_map(Op::FinishLoad),
            2 => any::<Index>().prop_map(Op::Release),
            2 => any::<Index>().prop_map(Op::EndJob),
            1 => (0u32..3, 0u64..8000).prop_map(|(device, mib)| Op::SetForeign { device, mib }),
            // Requests end a little more often than they start, so most models are idle most of the time.
            2 => (any::<Index>(), prop::bool::weighted(0.4)).prop_map(|(who, start)| Op::Use { who, start }),
            1 => any::<Index>().prop_map(Op::TogglePin),
            1 => any::<Index>().prop_map(Op::StartUnload),
            2 => (0u64..5000).prop_map(Op::Advance),
        ]
    }

    /// The arbiter as the properties see it.
    #[derive(Debug)]
    struct Model {
        devices: Vec<DeviceState>,
        residents: Vec<Resident>,
        holds: Vec<Hold>,
        /// Loads in flight: holder, priority, min residency. Their memory is a hold until they finish.
        loading: Vec<(String, i32, Millis)>,
        now: Millis,
        next_id: u64,
    }

    impl Model {
        /// Σ resident footprints + Σ holds on `device`.
        fn committed(&self, device: u32) -> i128 {
            let models: i128 =
                self.residents.iter().filter(|r| r.device == device).map(|r| i128::from(r.footprint_mib)).sum();
            models + self.holds.iter().filter(|h| h.device == device).map(|h| i128::from(h.mib)).sum::<i128>()
        }

        /// usable − foreign − committed, signed.
        fn headroom(&self, device: &DeviceState) -> i128 {
            i128::from(device.usable_mib) - i128::from(device.foreign_mib) - self.committed(device.index)
        }

        /// The victim rules, written independently of the code under test.
        fn eligible(&self, r: &Resident, request: &Request) -> bool {
            r.in_use == 0
                && r.ready
                && !r.pinned
                && self.now >= r.resident_since.saturating_add(r.min_residency)
                && r.priority <= request.priority
                && r.id != request.requester
        }

        fn conflicted(&self, device: u32, request: &Request) -> bool {
            self.holds
                .iter()
                .any(|h| h.device == device && h.holder != request.requester && (h.exclusive || request.exclusive))
        }
    }

    /// Checks one decision against the state it was made in; panics with the reason if a property fails.
    fn check(model: &Model, request: &Request, decision: &Decision) {
        // Decisions do not depend on the order of the inputs.
        let residents: Vec<Resident> = model.residents.iter().rev().cloned().collect();
        let holds: Vec<Hold> = model.holds.iter().rev().cloned().collect();
        assert_eq!(&decide(&model.devices, &residents, &holds, request, model.now), decision, "order matters");

        let candidates: Vec<&DeviceState> = match request.device {
            Some(wanted) => model.devices.iter().filter(|d| d.index == wanted).collect(),
            None => model.devices.iter().collect(),
        };
        let usable = |d: u32| model.devices.iter().find(|x| x.index == d).map(|x| x.usable_mib);
        let available = |d: &DeviceState| available_mib(d, &model.residents, &model.holds);
        let fitting: Vec<&DeviceState> = candidates
            .iter()
            .copied()
            .filter(|d| request.mib <= available(d) && !model.conflicted(d.index, request))
            .collect();

        // (e) NeverFits exactly when the request is bigger than every candidate's usable memory.
        let never = candidates.iter().all(|d| request.mib > d.usable_mib);
        assert_eq!(matches!(decision, Decision::NeverFits(_)), never, "NeverFits iff too big everywhere");

        // (c) A request that fits somewhere it may go is admitted, on the roomiest such device.
        if let Some(max) = fitting.iter().map(|d| available(d)).max() {
            let Decision::Admit { device } = decision else { panic!("fits but got {decision:?}") };
            let chosen = fitting.iter().find(|d| d.index == *device).expect("admitted on a fitting device");
            assert_eq!(available(chosen), max, "admitted where most is available");
        }

        match decision {
            Decision::Admit { device } => {
                let d = candidates.iter().find(|d| d.index == *device).expect("admit on a candidate");
                assert!(request.mib <= available(d));
                assert!(!model.conflicted(*device, request), "admitted past an exclusive conflict");
            }
            Decision::Evict { device, victims } => {
                let d = candidates.iter().find(|d| d.index == *device).expect("evict on a candidate");
                assert!(!model.conflicted(*device, request), "evicted past an exclusive conflict");
                // (d) Eviction only when needed, and every victim needed.
                assert!(!victims.is_empty());
                assert!(request.mib > available(d), "evicted for a request that fit");
                let mut footprints = Vec::new();
                for id in victims {
                    assert_eq!(victims.iter().filter(|v| *v == id).count(), 1, "victim {id} named twice");
                    let r = model
                        .residents
                        .iter()
                        .find(|r| &r.id == id && r.device == *device)
                        .expect("victim is a resident of the device");
                    // (b) Only idle, ready, unpinned, old enough, no higher priority, not the requester.
                    assert!(model.eligible(r, request), "ineligible victim {r:?} for {request:?}");
                    footprints.push(i128::from(r.footprint_mib));
                }
                let deficit = i128::from(request.mib) - model.headroom(d);
                let freed: i128 = footprints.iter().sum();
                assert!(freed >= deficit, "victims do not cover the deficit");
                for f in &footprints {
                    assert!(freed - f < deficit, "a victim was not needed");
                }
            }
            Decision::Wait(shortfall) => {
                assert!(usable(shortfall.device).is_some_and(|u| request.mib <= u), "waits on a device it fits");
                assert_eq!(shortfall.need_mib, request.mib);
                // Waiting is right only if no allowed device could be freed enough.
                for d in candidates.iter().filter(|d| !model.conflicted(d.index, request)) {
                    let evictable: i128 = model
                        .residents
                        .iter()
                        .filter(|r| r.device == d.index && model.eligible(r, request))
                        .map(|r| i128::from(r.footprint_mib))
                        .sum();
                    assert!(model.headroom(d) + evictable < i128::from(request.mib), "could have evicted on {d:?}");
                }
                assert!(!shortfall.to_string().is_empty());
            }
            Decision::NeverFits(shortfall) => assert_eq!(shortfall.need_mib, request.mib),
        }
    }

    fn apply(model: &mut Model, op: Op) {
        match op {
            Op::Request { mib, priority, device, exclusive, lease, min_residency, as_resident } => {
                let reuse = as_resident.and_then(|i| {
                    (!model.residents.is_empty()).then(|| model.residents[i.index(model.residents.len())].id.clone())
                });
                model.next_id += 1;
                let requester = match (&reuse, lease) {
                    (Some(id), _) => id.clone(),
                    (None, true) => format!("job{}", model.next_id),
                    (None, false) => format!("model{}", model.next_id),
                };
                // A model load is never exclusive; a job may be.
                let device = device.map(|pick| match pick {
                    Some(i) => model.devices[i.index(model.devices.len())].index,
                    None => 99,
                });
                let request = Request { requester, mib, device, priority, exclusive: exclusive && lease };
                let decision = decide(&model.devices, &model.residents, &model.holds, &request, model.now);
                check(model, &request, &decision);

                let device = match &decision {
                    Decision::Admit { device } => *device,
                    Decision::Evict { device, victims } => {
                        model.residents.retain(|r| !(r.device == *device && victims.contains(&r.id)));
                        *device
                    }
                    Decision::Wait(_) | Decision::NeverFits(_) => return,
                };
                model.holds.push(Hold { holder: request.requester.clone(), device, mib, exclusive: request.exclusive });
                if reuse.is_none() && !lease {
                    model.loading.push((request.requester, priority, min_residency));
                }
                // (a) The invariant: what is admitted fits in usable − foreign at the moment of admission.
                let d = model.devices.iter().find(|d| d.index == device).expect("admitted on a known device");
                assert!(model.headroom(d) >= 0, "over-committed GPU {device} after {decision:?}: {model:?}");
            }
            Op::FinishLoad(i) => {
                if model.loading.is_empty() {
                    return;
                }
                let (id, priority, min_residency) = model.loading.remove(i.index(model.loading.len()));
                if let Some(at) = model.holds.iter().position(|h| h.holder == id) {
                    let h = model.holds.remove(at);
                    model.residents.push(Resident {
                        id,
                        device: h.device,
                        footprint_mib: h.mib,
                        priority,
                        in_use: 0,
                        pinned: false,
                        ready: true,
                        last_used: model.now,
                        resident_since: model.now,
                        min_residency,
                    });
                }
            }
            Op::Release(i) => {
                let total = model.residents.len() + model.holds.len();
                if total == 0 {
                    return;
                }
                let at = i.index(total);
                if at < model.residents.len() {
                    model.residents.remove(at);
                } else {
                    let h = model.holds.remove(at - model.residents.len());
                    model.loading.retain(|(id, _, _)| *id != h.holder);
                }
            }
            Op::EndJob(i) => {
                let jobs: Vec<usize> = (0..model.holds.len())
                    .filter(|&at| !model.loading.iter().any(|(id, _, _)| *id == model.holds[at].holder))
                    .collect();
                if !jobs.is_empty() {
                    model.holds.remove(jobs[i.index(jobs.len())]);
                }
            }
            Op::SetForeign { device, mib } => {
                if let Some(d) = model.devices.iter_mut().find(|d| d.index == device) {
                    d.foreign_mib = mib;
                }
            }
            Op::Use { who, start } => {
                if model.residents.is_empty() {
                    return;
                }
                let now = model.now;
                let len = model.residents.len();
                let r = &mut model.residents[who.index(len)];
                r.in_use = if start { r.in_use + 1 } else { r.in_use.saturating_sub(1) };
                r.last_used = now;
            }
            Op::TogglePin(i) => {
                if !model.residents.is_empty() {
                    let len = model.residents.len();
                    let r = &mut model.residents[i.index(len)];
                    r.pinned = !r.pinned;
                }
            }
            Op::StartUnload(i) => {
                if !model.residents.is_empty() {
                    let len = model.residents.len();
                    model.residents[i.index(len)].ready = false;
                }
            }
            Op::Advance(ms) => model.now += ms,
        }
    }

    fn devices() -> impl Strategy<Value = Vec<DeviceState>> {
        prop::collection::vec((1000u64..16_000, 0u64..2000), 1..=3).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (usable_mib, foreign_mib))| DeviceState {
                    index: u32::try_from(i).expect("at most 3 devices"),
                    usable_mib,
                    foreign_mib,
                })
                .collect()
        })
    }

    /// A random snapshot of a nearly full machine, dense in eviction candidates. A device's usable
    /// memory is what is committed on it plus its foreign use plus a random slack that may be
    /// negative (over-committed: foreign use grew after admissions).
    fn snapshot() -> impl Strategy<Value = (Model, Request)> {
        let device = (0u64..2000, -1500i64..1500);
        let resident = (
            0u32..3,
            200u64..3000,
            -5i32..=5,
            prop_oneof![4 => Just(0u32), 1 => 1u32..3],
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.9),
            0u64..1000,
            0u64..1000,
            prop_oneof![Just(0u64), 0u64..500],
        );
        let hold = (0u32..3, 0u64..3000, prop::bool::weighted(0.1), 0u32..4);
        let request = (
            prop_oneof![6 => 1u64..4000, 1 => 1u64..16_000],
            // Often the top priority, so that priority does not hide the other rules.
            prop_oneof![-5i32..=5, Just(5)],
            prop::option::of(0u32..3),
            prop::bool::weighted(0.1),
            prop::option::of(0usize..16),
        );
        (
            prop::collection::vec(device, 1..=3),
            prop::collection::vec(resident, 0..16),
            prop::collection::vec(hold, 0..4),
            request,
            0u64..2000,
        )
            .prop_map(|(devices, residents, holds, (mib, priority, device, exclusive, as_resident), now)| {
                let residents: Vec<Resident> = residents
                    .into_iter()
                    .enumerate()
                    .map(|(i, (device, footprint_mib, priority, in_use, pinned, ready, last_used, since, min))| {
                        Resident {
                            id: format!("r{i}"),
                            device,
                            footprint_mib,
                            priority,
                            in_use,
                            pinned,
                            ready,
                            last_used,
                            resident_since: since,
                            min_residency: min,
                        }
                    })
                    .collect();
                let holds: Vec<Hold> = holds
                    .into_iter()
                    .map(|(device, mib, exclusive, who)| Hold { holder: format!("job{who}"), device, mib, exclusive })
                    .collect();
                let mut model = Model { devices: Vec::new(), residents, holds, loading: Vec::new(), now, next_id: 0 };
                model.devices = devices
                    .into_iter()
                    .enumerate()
                    .map(|(i, (foreign_mib, slack))| {
                        let index = u32::try_from(i).expect("at most 3 devices");
                        let full = i64::try_from(model.committed(index) + i128::from(foreign_mib)).expect("small");
                        let usable_mib = u64::try_from((full + slack).max(1000)).expect("positive");
                        DeviceState { index, usable_mib, foreign_mib }
                    })
                    .collect();
                // Sometimes an existing resident asks, sometimes a job that may hold something already.
                let requester = match as_resident {
                    Some(i) if i < model.residents.len() => model.residents[i].id.clone(),
                    Some(i) => format!("job{}", i % 4),
                    None => "new".to_owned(),
                };
                (model, Request { requester, mib, device, priority, exclusive })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn single_decisions_on_random_snapshots((model, request) in snapshot()) {
            let decision = decide(&model.devices, &model.residents, &model.holds, &request, model.now);
            check(&model, &request, &decision);
            // (a) Applying an admission keeps usable − foreign ≥ what is committed, over-committed or not before.
            let mut after = model;
            let device = match &decision {
                Decision::Admit { device } => *device,
                Decision::Evict { device, victims } => {
                    after.residents.retain(|r| !victims.contains(&r.id));
                    *device
                }
                Decision::Wait(_) | Decision::NeverFits(_) => return Ok(()),
            };
            let before = after.devices.iter().find(|d| d.index == device).map(|d| after.headroom(d));
            after.holds.push(Hold { holder: request.requester.clone(), device, mib: request.mib, exclusive: request.exclusive });
            let d = after.devices.iter().find(|d| d.index == device).expect("admitted on a known device");
            // An Admit on an already over-committed device (possible only for 0 MiB) cannot make it worse.
            prop_assert!(after.headroom(d) >= 0 || before.is_some_and(|b| after.headroom(d) == b && request.mib == 0));
        }

        #[test]
        fn decisions_keep_the_invariants(devices in devices(), ops in prop::collection::vec(op(), 1..80)) {
            let mut model =
                Model { devices, residents: Vec::new(), holds: Vec::new(), loading: Vec::new(), now: 0, next_id: 0 };
            for op in ops {
                apply(&mut model, op);
            }
        }

        #[test]
        fn victim_helpers_pick_only_idle_models(
            devices in devices(),
            ops in prop::collection::vec(op(), 1..80),
            device in 0u32..3,
        ) {
            let mut model =
                Model { devices, residents: Vec::new(), holds: Vec::new(), loading: Vec::new(), now: 0, next_id: 0 };
            for op in ops {
                apply(&mut model, op);
            }
            let idle = |r: &Resident| {
                r.in_use == 0 && r.ready && !r.pinned && model.now >= r.resident_since.saturating_add(r.min_residency)
            };
            let on_device: Vec<&Resident> = model.residents.iter().filter(|r| r.device == device && idle(r)).collect();
            match pressure_victim(device, &model.residents, model.now) {
                Some(id) => {
                    let v = on_device.iter().find(|r| r.id == id).expect("an idle resident of the device");
                    prop_assert!(on_device.iter().all(|r| (r.priority, r.last_used) >= (v.priority, v.last_used)));
                }
                None => prop_assert!(on_device.is_empty()),
            }
            let all: Vec<&Resident> = model.residents.iter().filter(|r| idle(r)).collect();
            match cap_victim(&model.residents, model.now) {
                Some(id) => {
                    let v = all.iter().find(|r| r.id == id).expect("an idle resident");
                    prop_assert!(all.iter().all(|r| r.last_used >= v.last_used));
                }
                None => prop_assert!(all.is_empty()),
            }
        }
    }

    #[test]
    fn the_failure_cooldown_starts_at_10_s_and_doubles_up_to_5_min() {
        let secs = |failures| failure_cooldown(failures).map(|d| d.as_secs());
        for failures in 0..FAILURES_BEFORE_COOLDOWN {
            assert_eq!(secs(failures), None, "no cooldown after {failures} failures");
        }
        let sequence: Vec<Option<u64>> = (3..=10).map(secs).collect();
        let expected = [10, 20, 40, 80, 160, 300, 300, 300].map(Some);
        assert_eq!(sequence, expected);
        // However long the run of failures, the cooldown stays at the cap (no overflow).
        assert_eq!(secs(1000), Some(300));
        assert_eq!(secs(u32::MAX), Some(300));
    }
}
