//go:build tools

// The S3 server built from this module (gofakes3's own command); importing its package keeps
// it in go.mod and go.sum.
package tools

import (
	_ "github.com/johannesboyne/gofakes3/cmd/gofakes3"
)
