//! cryptoki errors in words: which PKCS#11 function failed, the CKR_ code, what to do.

use cryptoki::error::{Error, RvError};

use super::connection::Pkcs11Failure;
use crate::token::TokenError;

/// Whether the session (or the login it carried) is gone and worth one reopen.
pub(super) fn session_lost(e: &Error) -> bool {
    matches!(
        e,
        Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::DeviceError
                | RvError::ObjectHandleInvalid
                | RvError::KeyHandleInvalid,
            _
        )
    )
}

/// The object a handle named is gone (deleted, or the handle belongs to an older session).
pub(super) fn object_gone(f: &Pkcs11Failure) -> bool {
    matches!(
        f,
        Pkcs11Failure::Ck(Error::Pkcs11(
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
            _
        ))
    )
}

/// Maps a cryptoki error to a `TokenError` naming the function and a hint.
pub(super) fn ck(e: Error) -> TokenError {
    let Error::Pkcs11(rv, function) = &e else {
        return TokenError::Cryptoki {
            reason: e.to_string(),
        };
    };
    let hint = match rv {
        RvError::DeviceRemoved | RvError::TokenNotPresent | RvError::DeviceError => {
            return TokenError::Unavailable {
                reason: format!("{function:?}: {}", rv_name(*rv)),
            };
        }
        RvError::MechanismInvalid => {
            "the token lacks this mechanism; pick another algorithm or fix the hsm-profile"
        }
        RvError::KeyFunctionNotPermitted => {
            "the key's usage attributes or CKA_ALLOWED_MECHANISMS forbid this operation"
        }
        RvError::TemplateInconsistent | RvError::AttributeValueInvalid => {
            "the token refused keybound's key template; list the refused usage in the profile's [template] omit"
        }
        RvError::UserNotLoggedIn => {
            "the login was lost; keybound logs in again on the next request"
        }
        RvError::TokenWriteProtected => "the token is read-only",
        RvError::DeviceMemory => "the token is out of memory for objects",
        _ => "",
    };
    TokenError::Pkcs11 {
        function: format!("C_{function:?}"),
        rv: *rv,
        hint: hint.into(),
    }
}

pub(super) use crate::token::error::rv_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_like_the_spec() {
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(rv_name(RvError::UserNotLoggedIn), "CKR_USER_NOT_LOGGED_IN");
    }
}
