"""gimme-escrow: holds a trial's price between buyer and seller until the buyer's PASS or an
arbiter's ruling settles it."""
