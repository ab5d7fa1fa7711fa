"""What every package of the toolkit shares: its errors and their one-line reporting (`errors`), atomic
writes and checked reads of files (`io`), image files read with their header's size checked first
(`images`), the memory left to allocate (`memory`), the claim on an output directory (`outdir`) and
stopping on signals (`signals`). It imports none of cocolvis, ess or bench."""
