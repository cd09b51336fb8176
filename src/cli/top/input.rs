//! Which key does what in `vramgate top` (the help text in mod.rs lists the same keys).

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::state::Key;

/// The meaning of a key press, or None for keys `top` does not use (and for key releases, which
/// some terminals report as well).
pub(crate) fn key_of(event: &KeyEvent) -> Option<Key> {
    if event.kind == KeyEventKind::Release {
        return None;
    }
    // In raw mode Ctrl-C is a key like any other, not a SIGINT: it must quit all the same.
    if event.modifiers.contains(KeyModifiers::CONTROL) {
        return matches!(event.code, KeyCode::Char('c' | 'C')).then_some(Key::Quit);
    }
    Some(match event.code {
        KeyCode::Up | KeyCode::Char('k') => Key::Up,
        KeyCode::Down | KeyCode::Char('j') => Key::Down,
        KeyCode::Char('l') => Key::Load,
        KeyCode::Char('u') => Key::Unload,
        KeyCode::Char('m') => Key::Mode,
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Escape,
        KeyCode::Char('q') => Key::Quit,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(code: KeyCode, modifiers: KeyModifiers) -> Option<Key> {
        key_of(&KeyEvent::new(code, modifiers))
    }

    #[test]
    fn keys_map_to_their_actions() {
        let none = KeyModifiers::NONE;
        assert_eq!(press(KeyCode::Up, none), Some(Key::Up));
        assert_eq!(press(KeyCode::Char('k'), none), Some(Key::Up));
        assert_eq!(press(KeyCode::Down, none), Some(Key::Down));
        assert_eq!(press(KeyCode::Char('j'), none), Some(Key::Down));
        assert_eq!(press(KeyCode::Char('l'), none), Some(Key::Load));
        assert_eq!(press(KeyCode::Char('u'), none), Some(Key::Unload));
        assert_eq!(press(KeyCode::Char('m'), none), Some(Key::Mode));
        assert_eq!(press(KeyCode::Enter, none), Some(Key::Enter));
        assert_eq!(press(KeyCode::Esc, none), Some(Key::Escape));
        assert_eq!(press(KeyCode::Char('q'), none), Some(Key::Quit));
        assert_eq!(press(KeyCode::Char('c'), KeyModifiers::CONTROL), Some(Key::Quit));
        assert_eq!(press(KeyCode::Char('x'), none), None);
        // Ctrl-L is not `l`: a modified key is not taken for the plain one.
        assert_eq!(press(KeyCode::Char('l'), KeyModifiers::CONTROL), None);
        let release = KeyEvent::new_with_kind(KeyCode::Char('q'), none, KeyEventKind::Release);
        assert_eq!(key_of(&release), None);
    }
}
