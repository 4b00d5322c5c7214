package config

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"strings"

	"go.yaml.in/yaml/v3"
)

const (
	hashPrefix = "sha256:"
	// minPlainKeyLen keeps plain keys out of reach of guessing; a hashed key
	// cannot be checked, so its owner is trusted to have made it long.
	minPlainKeyLen = 16
)

// Key is an API key as configured: plain text, or "sha256:" followed by the
// 64 hex digits of the key's SHA-256 digest (`printf %s "$KEY" | sha256sum`).
// It keeps only the digest, so no copy of a plain key stays in memory past
// parsing, and String shows the digest form.
//
// The zero Key matches nothing. Keys compare with Equal (go-cmp uses it).
type Key struct {
	digest [sha256.Size]byte
	valid  bool
	// problem is why the text decoded from YAML is not a valid key. Decoding
	// does not fail on it, so that Validate can report it with the key's path
	// together with every other problem in the file.
	problem string
}

// ParseKey parses a configured key: plain text of at least 16 printable
// ASCII characters, or "sha256:<64 hex digits>". Errors never repeat the key.
func ParseKey(s string) (Key, error) {
	if hexDigest, ok := strings.CutPrefix(s, hashPrefix); ok {
		if len(hexDigest) != 2*sha256.Size {
			return Key{}, fmt.Errorf("a hashed key must be %q followed by 64 hex digits, got %d characters after the prefix", hashPrefix, len(hexDigest))
		}
		b, err := hex.DecodeString(hexDigest)
		if err != nil {
			return Key{}, fmt.Errorf("a hashed key must be %q followed by 64 hex digits; this one has a character that is not a hex digit", hashPrefix)
		}
		k := Key{valid: true}
		copy(k.digest[:], b)
		return k, nil
	}
	if s == "" {
		return Key{}, fmt.Errorf("empty key")
	}
	for _, r := range s {
		if r <= ' ' || r > '~' {
			return Key{}, fmt.Errorf("a key may hold only printable ASCII characters without spaces, since clients send it in an HTTP header")
		}
	}
	if len(s) < minPlainKeyLen {
		return Key{}, fmt.Errorf("a plain key must be at least %d characters long, this one has %d (make one with `openssl rand -hex 24`)", minPlainKeyLen, len(s))
	}
	return Key{digest: sha256.Sum256([]byte(s)), valid: true}, nil
}

// HashKey returns the "sha256:<hex>" form of a plain key, which may be written
// in the config file instead of the key itself.
func HashKey(plain string) string {
	d := sha256.Sum256([]byte(plain))
	return hashPrefix + hex.EncodeToString(d[:])
}

// Matches reports whether presented is this key, comparing digests in
// constant time.
func (k Key) Matches(presented string) bool {
	return k.matchesDigest(digestOf(presented))
}

func (k Key) matchesDigest(d [sha256.Size]byte) bool {
	eq := subtle.ConstantTimeCompare(k.digest[:], d[:]) == 1
	return eq && k.valid
}

func digestOf(presented string) [sha256.Size]byte {
	return sha256.Sum256([]byte(presented))
}

// String returns "sha256:<hex>", never the plain key, so a Key can be printed
// or logged safely.
func (k Key) String() string {
	switch {
	case k.valid:
		return hashPrefix + hex.EncodeToString(k.digest[:])
	case k.problem != "":
		return "(invalid key)"
	default:
		return "(no key)"
	}
}

// short is the form Dump prints: enough of the digest to tell keys apart.
func (k Key) short() string {
	if !k.valid {
		return k.String()
	}
	return hashPrefix + hex.EncodeToString(k.digest[:4]) + "…"
}

// Equal reports whether k and o are the same key.
func (k Key) Equal(o Key) bool {
	return k.valid == o.valid && k.digest == o.digest && k.problem == o.problem
}

// UnmarshalYAML reads a key from a string scalar. An invalid key is kept as
// such and reported by Validate with its path (see Key.problem).
func (k *Key) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		*k = Key{problem: "a key must be a string"}
		return nil
	}
	parsed, err := ParseKey(n.Value)
	if err != nil {
		*k = Key{problem: err.Error()}
		return nil
	}
	*k = parsed
	return nil
}

// MarshalYAML writes the key in its hashed form.
func (k Key) MarshalYAML() (any, error) {
	return k.String(), nil
}

// MarshalText writes the key in its hashed form, so that encoding/json and
// log/slog show the digest too.
func (k Key) MarshalText() ([]byte, error) {
	return []byte(k.String()), nil
}

// check returns why k cannot be used, or "" if it can.
func (k Key) check() string {
	switch {
	case k.valid:
		return ""
	case k.problem != "":
		return k.problem
	default:
		return "empty key"
	}
}
