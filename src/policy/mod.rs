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
mod properties;
#[cfg(test)]
mod tests;
