"""What every package of the toolkit shares: its errors and their one-line reporting (`errors`) and
atomic writes and checked reads of files (`io`). It imports none of cocolvis, ess or bench."""
