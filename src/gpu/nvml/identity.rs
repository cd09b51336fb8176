//! Which device is which: names at start-up, and each device found again by its UUID after NVML
//! is re-initialised, since NVML numbers devices afresh at each init (a GPU that left the bus
//! shifts the ones after it; a reset can reorder them). The daemon's device index is the one at
//! start-up, for its whole life, and must keep meaning the same card. Pure: the NVML answers are
//! arguments.

use super::super::ProbeError;

/// The names of `count` devices at start-up, from each device's answer (`name_of`). A device that
/// does not answer (`GPU_IS_LOST` at start) gets a plain name (`NVIDIA GPU N`) and is sampled like
/// the others, so its readings report it failed while the rest work; only when no device answers is
/// it an error (and `auto` falls through). For `NvmlProbe::open`.
pub fn device_names(count: u32, name_of: impl Fn(u32) -> Result<String, String>) -> Result<Vec<String>, ProbeError> {
    let answers: Vec<Result<String, String>> = (0..count).map(&name_of).collect();
    if !answers.is_empty() && answers.iter().all(Result::is_err) {
        let reasons: Vec<String> = answers
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().err().map(|e| format!("NVML device {i}: {e}")))
            .collect();
        return Err(ProbeError(format!("no NVML device answers: {}", reasons.join("; "))));
    }
    Ok(answers.into_iter().enumerate().map(|(i, a)| a.unwrap_or_else(|_| format!("NVIDIA GPU {i}"))).collect())
}

/// Where each device known since start-up is in NVML's numbering now. `known[i]`: the UUID device
/// `i` had when it was last read (`None`: it never answered); `listed[j]`: the UUID of NVML's
/// device `j` now (`None`: it does not answer). Each known device is:
/// - at the index that lists its UUID;
/// - if no index lists it, at its own index when that one does not answer either and is no other
///   known device's (most likely the same card, still lost: its readings fail with its own
///   error);
/// - a device without a known UUID stays at its own index, unless that index is another known
///   device's;
/// - else gone, with why: it is failed, never read as another card.
pub fn locate(known: &[Option<String>], listed: &[Option<String>]) -> Vec<Result<u32, String>> {
    let claimed = |j: usize, except: usize| {
        listed[j]
            .as_ref()
            .is_some_and(|uuid| known.iter().enumerate().any(|(i, other)| i != except && other.as_ref() == Some(uuid)))
    };
    known
        .iter()
        .enumerate()
        .map(|(i, uuid)| {
            let own = (i < listed.len() && !claimed(i, i)).then_some(i);
            let found = match uuid {
                Some(uuid) => listed
                    .iter()
                    .position(|now| now.as_ref() == Some(uuid))
                    .or_else(|| own.filter(|&j| listed[j].is_none())),
                None => own,
            };
            found.and_then(|j| u32::try_from(j).ok()).ok_or_else(|| match uuid {
                Some(uuid) => format!(
                    "not listed by NVML since it was re-initialised (UUID {uuid}): it left the bus or was removed"
                ),
                None => "not listed by NVML since it was re-initialised".to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At start-up one device that does not answer leaves the others usable; none answering is
    /// an error naming each.
    #[test]
    fn start_up_names_survive_a_lost_device_but_not_all_lost() {
        let one_lost = |i: u32| if i == 1 { Err("GPU is lost".to_string()) } else { Ok(format!("RTX {i}")) };
        assert_eq!(device_names(3, one_lost).unwrap(), ["RTX 0", "NVIDIA GPU 1", "RTX 2"]);
        let err = device_names(2, |_| Err("GPU is lost".to_string())).unwrap_err();
        assert!(err.0.contains("NVML device 0: GPU is lost") && err.0.contains("NVML device 1"), "{err}");
        assert_eq!(device_names(0, one_lost).unwrap(), Vec::<String>::new());
    }

    fn uuids(list: &[Option<&str>]) -> Vec<Option<String>> {
        list.iter().map(|u| u.map(str::to_string)).collect()
    }

    #[test]
    fn devices_are_found_by_uuid_after_a_reinitialisation() {
        let known = uuids(&[Some("GPU-a"), Some("GPU-b"), Some("GPU-c")]);
        // Unchanged.
        assert_eq!(locate(&known, &known), [Ok(0), Ok(1), Ok(2)]);
        // Reordered.
        assert_eq!(locate(&known, &uuids(&[Some("GPU-c"), Some("GPU-a"), Some("GPU-b")])), [Ok(1), Ok(2), Ok(0)]);
        // GPU-a left the bus: the others shifted down; a is gone, not read as b.
        let gone = locate(&known, &uuids(&[Some("GPU-b"), Some("GPU-c")]));
        assert_eq!(gone[1..], [Ok(0), Ok(1)]);
        assert!(gone[0].as_ref().is_err_and(|e| e.contains("UUID GPU-a") && e.contains("left the bus")), "{gone:?}");
        // Still lost (it does not answer at its index): kept there, so its own error shows.
        assert_eq!(locate(&known, &uuids(&[None, Some("GPU-b"), Some("GPU-c")])), [Ok(0), Ok(1), Ok(2)]);
        // Its index now answers as another known card: gone rather than that card twice.
        let moved = locate(&known, &uuids(&[Some("GPU-b"), None, Some("GPU-c")]));
        assert!(moved[0].is_err(), "{moved:?}");
        assert_eq!(moved[1..], [Ok(0), Ok(2)], "b found at 0; c where it was");
    }

    #[test]
    fn a_device_without_a_known_uuid_keeps_its_index_unless_another_device_is_there() {
        let known = uuids(&[Some("GPU-a"), None]);
        assert_eq!(locate(&known, &uuids(&[Some("GPU-a"), Some("GPU-new")])), [Ok(0), Ok(1)]);
        assert_eq!(locate(&known, &uuids(&[Some("GPU-a"), None])), [Ok(0), Ok(1)]);
        let taken = locate(&known, &uuids(&[None, Some("GPU-a")]));
        assert_eq!(taken[0], Ok(1));
        assert!(taken[1].is_err(), "index 1 is GPU-a now: {taken:?}");
        assert!(locate(&known, &uuids(&[Some("GPU-a")]))[1].is_err(), "fewer devices now");
    }
}
