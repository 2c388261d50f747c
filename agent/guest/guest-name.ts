// What a guest may be called: its name becomes part of file names, QEMU's -name and URLs.
export const GUEST_NAME_PATTERN = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;
