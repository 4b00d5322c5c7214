package config

import (
	"encoding/hex"
	"fmt"
)

// publishedKeyDigests are the SHA-256 digests (hex) of every key written in
// sluice.example.yaml. That file is in the repository, so anyone who has read
// it can use those keys: a sluice reachable from other machines must not
// accept them. TestPublishedKeysCoverExample re-reads the example file and
// fails if a key in it is missing here.
var publishedKeyDigests = map[string]string{
	// admin_keys[0]: "example-admin-key-0003"
	"872e9c9137f77204ba4c3dbc3a44d78312efa8e7576c226dee833bc5c70b0d78": "example-admin-key-0003",
	// tenants[0].keys[0] (classroom), written plain
	"e7651ee649f1908c25535ad2b6611aa5537e5d79b8fc6281516ba100e4ad549e": "example-classroom-key-0001",
	// tenants[1].keys[0] (research): "example-research-key-0002"
	"d52c8971988b9a512c81307c58a22395654bc25924ec6e5e667792a05d08acbf": "example-research-key-0002",
}

// IsPublished reports whether k is one of the keys published in
// sluice.example.yaml, whether it was written plain or hashed.
func (k Key) IsPublished() bool {
	if !k.valid {
		return false
	}
	_, ok := publishedKeyDigests[hex.EncodeToString(k.digest[:])]
	return ok
}

// PublishedKeys returns the config paths (e.g. "tenants[0].keys[0]",
// "admin_keys[0]") of the tenant and admin keys in c that are published in
// sluice.example.yaml. An admin key from SLUICE_ADMIN_KEY is the last entry
// of admin_keys.
func (c *Config) PublishedKeys() []string {
	var paths []string
	for i, k := range c.AdminKeys {
		if k.IsPublished() {
			paths = append(paths, fmt.Sprintf("admin_keys[%d]", i))
		}
	}
	for i, t := range c.Tenants {
		for j, k := range t.Keys {
			if k.IsPublished() {
				paths = append(paths, fmt.Sprintf("tenants[%d].keys[%d]", i, j))
			}
		}
	}
	return paths
}
